"""issue 26: the mask store is self-describing for third-party Zarr readers. Every array
has one ``dimension_names`` entry of its own (``<tensor>.bytes``, ``.gaps``, ``.values``),
so xarray opens a store (and a patch's ``values`` group) as a Dataset; the parameter's
shape is also the ``parameter_shape`` attribute (the ``shape`` attribute is the parameter's,
not the array's). Every mask is rebuilt from what xarray returns, with numpy only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from factory import make_pair

from maskhub import Registry

xr = pytest.importorskip("xarray")


def rebuild(var: xr.DataArray) -> np.ndarray:
    """The README's numpy lines, on an xarray variable."""
    shape = var.attrs["parameter_shape"]
    a = var.values
    if var.attrs.get("encoding") == "gaps-u8":
        c = a.astype(np.int64)
        bits = np.zeros(math.prod(shape), dtype=bool)
        bits[np.cumsum(c + (c < 255))[c < 255] - 1] = True
        return bits.reshape(shape)
    return np.unpackbits(a, count=math.prod(shape),
                         bitorder=var.attrs["bitorder"]).astype(bool).reshape(shape)


def test_xarray_opens_a_patch_store_and_rebuilds_every_mask(tmp_path: Path) -> None:
    base, target, planted = make_pair(tmp_path, density=0.15)
    reg = Registry()
    mask = reg.diff(base, target, name="p", device="cpu", patch=True)
    sparse = {"a.weight": np.random.default_rng(1).random((64, 48)) < 0.01}
    gaps = reg.add(sparse, name="g", base_model="org/base")

    ds = xr.open_zarr(str(mask.path), zarr_format=3, consolidated=False)
    assert set(ds.data_vars) == set(planted)
    for name, want in planted.items():
        var = ds[name]
        kind = "gaps" if var.attrs.get("encoding") == "gaps-u8" else "bytes"
        assert var.dims == (f"{name}.{kind}",)
        assert var.attrs["parameter_shape"] == var.attrs["shape"] == list(want.shape)
        assert var.dtype == np.uint8
        assert np.array_equal(rebuild(var), want), name
    assert ds.attrs["name"] == "p" and ds.attrs["n_updated"] == sum(
        int(m.sum()) for m in planted.values())
    values = xr.open_zarr(str(mask.path), group="values", zarr_format=3, consolidated=False)
    assert set(values.data_vars) == set(planted)  # an empty tensor's has no entries
    for name in planted:
        assert values[name].dims == (f"{name}.values",)
        assert values[name].shape == (int(planted[name].sum()),)

    g = xr.open_zarr(str(gaps.path), zarr_format=3, consolidated=False)
    assert g["a.weight"].attrs["encoding"] == "gaps-u8"
    assert g["a.weight"].dims == ("a.weight.gaps",)
    assert np.array_equal(rebuild(g["a.weight"]), sparse["a.weight"])
    # stock zarr sees the same names
    arr = zarr.open_array(str(gaps.path / "a.weight"), mode="r")
    assert arr.metadata.dimension_names == ("a.weight.gaps",)
