"""The fast diff kernels give exactly the bits of the float64 reference definition."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskhub.kernels import fastkernel
from maskhub.kernels.floatbits import BF16, FP16, FP32
from maskhub.kernels.kernel import DiffKernel, updated

BACKENDS = ["numba", "numpy"] if fastkernel.HAVE_NUMBA else ["numpy"]
FLOATS = [torch.bfloat16, torch.float16, torch.float32]
# Tolerances: the usual ones, exact powers of two (= some representable differences), 0.
TOLS = [0.0, 1e-5, 1e-4, 1e-3, 2.0 ** -17, 2.0 ** -9, 3e-8, 0.25, 1e-30]


def _values(rng: np.random.Generator, n: int, tol: float) -> np.ndarray:
    """float64 values mixing weights, magnitudes near the decisive thresholds and specials."""
    scale = max(tol, 1e-6)
    kinds = rng.integers(0, 6, n)
    v = rng.normal(0, 0.02, n)
    v = np.where(kinds == 1, rng.uniform(-8, 8, n) * scale * 2.0 ** rng.integers(0, 10, n), v)
    v = np.where(kinds == 2, rng.choice([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40, -1e-42,
                                         6e-8, 2.0 ** -126], n), v)
    v = np.where(kinds == 3, rng.uniform(-1, 1, n) * 2.0 ** rng.integers(-30, 10, n), v)
    v = np.where(kinds == 4, rng.normal(0, 2.0 ** -9, n), v)
    return v


def _perturb(rng: np.random.Generator, a: np.ndarray, tol: float) -> np.ndarray:
    """Targets: unchanged, moved by about tol, by tiny or large steps, specials, random."""
    n = a.size
    move = rng.integers(0, 8, n)
    step = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    b = a.copy()
    b = np.where(move == 1, a + step * tol, b)
    b = np.where(move == 2, a + step * tol * (1 + rng.choice([-1e-3, 1e-3, -0.5, 0.5], n)), b)
    b = np.where(move == 3, a * (1 + step * 2.0 ** -rng.integers(1, 12, n)), b)
    b = np.where(move == 4, rng.choice([0.0, -0.0, np.nan, np.inf, -np.inf], n), b)
    b = np.where(move == 5, rng.normal(0, 0.02, n), b)
    b = np.where(move == 6, -a, b)
    return b


def _bit_nudge(t: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Move some entries by one or two units in the last place (bit-pattern increments)."""
    ints = {2: torch.int16, 4: torch.int32}[t.element_size()]
    bits = t.view(ints).clone()
    which = torch.from_numpy(rng.random(t.numel()) < 0.2)
    delta = torch.from_numpy(rng.choice([-2, -1, 1, 2], t.numel())).to(ints)
    bits[which] += delta[which]
    return bits.view(t.dtype)


def _reference_check(a: torch.Tensor, b: torch.Tensor, tol: float, sweep: list[float],
                     backend: str) -> None:
    k = DiffKernel(tol=tol, sweep=sweep, backend=backend)
    res = k.run(a, b)
    want = updated(a, b, tol).numpy().reshape(-1)
    got = np.unpackbits(res.packed, count=a.numel(), bitorder="little").astype(bool)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (
        f"first mismatch at {bad[0]}: base {a.reshape(-1)[bad[0]].item()!r} target "
        f"{b.reshape(-1)[bad[0]].item()!r} tol {tol} fast {got[bad[0]]} ref {want[bad[0]]}")
    assert res.n_updated == int(want.sum())
    assert res.sweep_counts == tuple(int(updated(a, b, t).sum()) for t in sweep)
    if a.numel() % 8:
        assert res.packed[-1] >> (a.numel() % 8) == 0  # padding bits stay clear


@st.composite
def _pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float, list[float], int]:
    n = draw(st.integers(1, 300))
    tol = draw(st.sampled_from(TOLS) | st.floats(0, 1e-2))
    sweep = draw(st.lists(st.sampled_from(TOLS), max_size=3, unique=True))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    a = _values(rng, n, tol)
    return a, _perturb(rng, a, tol), tol, sweep, seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_pairs())
def test_fast_path_matches_float64_reference(dtype: torch.dtype, backend: str, case) -> None:
    a64, b64, tol, sweep, seed = case
    with np.errstate(over="ignore", invalid="ignore"):
        a = torch.from_numpy(a64).to(dtype)
        b = torch.from_numpy(b64).to(dtype)
    _reference_check(a, b, tol, sweep, backend)
    _reference_check(a, _bit_nudge(a, np.random.default_rng(seed)), tol, sweep, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32),
                                    (torch.float16, torch.bfloat16),
                                    (torch.float32, torch.float16),
                                    (torch.bfloat16, torch.float16)], ids=str)
@settings(max_examples=60, deadline=None)
@given(case=_pairs())
def test_mixed_dtypes_match_reference(dtypes: tuple[torch.dtype, torch.dtype], backend: str,
                                      case) -> None:
    a64, b64, tol, sweep, _ = case
    with np.errstate(over="ignore", invalid="ignore"):
        a = torch.from_numpy(a64).to(dtypes[0])
        b = torch.from_numpy(b64).to(dtypes[1])
    _reference_check(a, b, tol, sweep, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_every_bit_pattern_pair_class(dtype: torch.dtype, backend: str) -> None:
    """All 65536 bf16/fp16 patterns (a sample for fp32) against neighbours and specials."""
    rng = np.random.default_rng(7)
    if dtype == torch.float32:
        bits = torch.from_numpy(rng.integers(-2 ** 31, 2 ** 31, 1 << 17, dtype=np.int32))
    else:
        bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    a = bits.view(dtype)
    for tol in (0.0, 1e-5, 2.0 ** -16):
        _reference_check(a, _bit_nudge(a, rng), tol, [1e-6], backend)
        _reference_check(a, a[torch.randperm(a.numel(), generator=torch.Generator()
                                              .manual_seed(1))], tol, [], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_values_exact(backend: str) -> None:
    nan, inf = float("nan"), float("inf")
    base = [0.0, -0.0, nan, nan, 1.0, inf, inf, 1.0, 1.0, 2.0 ** -9, 0.0, 5.0]
    targ = [-0.0, 0.0, nan, 1.0, nan, inf, -inf, inf, 1.0078125, 2.0 ** -9 + 2.0 ** -16,
            1e-5, 5.0]
    want = [False, False, False, True, True, False, True, True, True, True, False, False]
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.tensor(base, dtype=dtype), torch.tensor(targ, dtype=dtype)
        res = DiffKernel(tol=1e-5, backend=backend).run(a, b)
        got = np.unpackbits(res.packed, count=len(base), bitorder="little").astype(bool)
        # 1e-5 rounds to 1.0014e-5 in bf16 (updated) and to 9.99999975e-6 in fp32 (not).
        exp = list(want)
        exp[10] = dtype == torch.bfloat16
        assert got.tolist() == exp, dtype
    # tol = 0: any value change, but the ±0 pair and NaN pairs are unchanged.
    a = torch.tensor([0.0, nan, 1.0, 2.0 ** -133], dtype=torch.bfloat16)
    b = torch.tensor([-0.0, -nan, 1.0, 0.0], dtype=torch.bfloat16)
    res = DiffKernel(tol=0.0, backend=backend).run(a, b)
    assert np.unpackbits(res.packed, count=4, bitorder="little").tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_difference_equal_to_tol_is_not_updated(backend: str) -> None:
    # bf16 neighbours of 1.0 differ by 2**-7; at tol == 2**-7 they are unchanged, just below
    # it they are updated.
    a = torch.full((17,), 1.0, dtype=torch.bfloat16)
    b = torch.full((17,), 1.0078125, dtype=torch.bfloat16)
    assert DiffKernel(tol=2.0 ** -7, backend=backend).run(a, b).n_updated == 0
    res = DiffKernel(tol=math.nextafter(2.0 ** -7, 0), sweep=[2.0 ** -7, 0.0],
                     backend=backend).run(a, b)
    assert (res.n_updated, res.sweep_counts) == (17, (0, 17))


def test_other_dtypes_use_the_reference() -> None:
    a = torch.tensor([1.0, 2.0, 3.0, float("nan")], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0 + 1e-6, 3.1, float("nan")], dtype=torch.float64)
    res = DiffKernel(tol=1e-5, sweep=[0.0]).run(a, b)
    assert np.unpackbits(res.packed, count=4, bitorder="little").tolist() == [0, 0, 1, 0]
    assert res.sweep_counts == (2,)
    ai = torch.tensor([1, 2, 3], dtype=torch.int64)
    res = DiffKernel(tol=0.5).run(ai, torch.tensor([1, 3, 3], dtype=torch.int64))
    assert np.unpackbits(res.packed, count=3, bitorder="little").tolist() == [0, 1, 0]


def test_decisive_thresholds() -> None:
    # bf16 at 1e-5: one step exceeds 1e-5 from 2**-9 up (2**-16 > 1e-5 > 2**-17).
    assert BF16.decisive_bits(1e-5) == BF16.pow2_bits(-9) == 0x3B00
    # Exactly representable tol: the spacing must be strictly greater.
    assert BF16.decisive_bits(2.0 ** -17) == BF16.pow2_bits(-9)
    assert BF16.decisive_bits(2.0 ** -16) == BF16.pow2_bits(-8)
    assert FP16.decisive_bits(1e-5) == FP16.pow2_bits(-6)
    # fp32 resolves 1e-5 up to 2**7: nearly every changed fp32 entry takes the exact check.
    assert FP32.decisive_bits(1e-5) == FP32.pow2_bits(7)
    # tol 0: everything but zero is decided from the bits (smallest subnormal and up).
    assert BF16.decisive_bits(0.0) == 1
    assert FP16.decisive_bits(1e-9) == FP16.pow2_bits(-24) == 1
    assert BF16.decisive_bits(2.0 ** 130) == BF16.inf_bits + 1
    assert BF16.pow2_bits(127) == 0x7F00


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_tensor_larger_than_a_chunk(backend: str) -> None:
    from maskhub.kernels import kernel

    n = kernel.CHUNK * 2 + 13
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    noise = torch.randn(n, generator=g) * 1e-4 * (torch.rand(n, generator=g) < 0.2)
    b = (a.double() + noise.double()).to(torch.bfloat16)
    _reference_check(a, b, 1e-5, [0.0, 1e-4], backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", FLOATS + [torch.float64], ids=str)
def test_cuda_path_matches_reference(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(5)
    n = (1 << 22) + 5
    a64 = _values(rng, n, 1e-5)
    with np.errstate(over="ignore", invalid="ignore"):
        a = torch.from_numpy(a64).to(dtype)
        b = torch.from_numpy(_perturb(rng, a64, 1e-5)).to(dtype)
    k = DiffKernel(tol=1e-5, sweep=[0.0, 1e-4], device="cuda")
    res = k.run(a, b)
    want = updated(a, b, 1e-5).numpy()
    got = np.unpackbits(res.packed, count=n, bitorder="little").astype(bool)
    assert (got == want).all()
    assert res.sweep_counts == (int(updated(a, b, 0.0).sum()), int(updated(a, b, 1e-4).sum()))


def _pipeline_pair(root) -> tuple:
    from factory import save

    g = torch.Generator().manual_seed(11)
    from maskhub.kernels import kernel

    big = kernel.CHUNK * 3 + 5  # several chunks, odd tail
    base = {
        "model.embed_tokens.weight": (torch.randn(big, generator=g) * 0.02).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(37, 29, generator=g).half(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(64, 33, generator=g),
        "model.layers.0.input_layernorm.weight": torch.ones(33, dtype=torch.bfloat16),
        "model.layers.0.empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "model.layers.0.mixed.weight": torch.randn(100, generator=g).to(torch.bfloat16),
        "model.layers.0.f64.weight": torch.randn(50, generator=g).double(),
    }
    target = {}
    for name, t in base.items():
        noise = torch.randn(t.shape, generator=g).double() * 1e-4
        keep = torch.rand(t.shape, generator=g) < 0.7
        target[name] = torch.where(keep, t.double(), t.double() + noise).to(t.dtype)
    target["model.layers.0.mixed.weight"] = target["model.layers.0.mixed.weight"].float()
    target["model.layers.0.input_layernorm.weight"] = base["model.layers.0.input_layernorm.weight"]
    save(base, root / "base", shards=3)
    save(target, root / "target", shards=2)
    return base, target


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_pipeline_stores_exactly_the_reference_bits(tmp_path, backend: str) -> None:
    from maskhub.checkpoints.pairing import match_tensors
    from maskhub.checkpoints.sources import open_checkpoint
    from maskhub.diff.pipeline import run_diff
    from maskhub.storage.store import MaskStore, MaskWriter

    base, target = _pipeline_pair(tmp_path)
    b_ck, t_ck = open_checkpoint(tmp_path / "base"), open_checkpoint(tmp_path / "target")
    names, _ = match_tensors(b_ck, t_ck, allow_missing=False)
    writer = MaskWriter(tmp_path / "m.zarr")
    seen = []
    outcome = run_diff(b_ck, t_ck, names, DiffKernel(1e-5, sweep=[0.0, 1e-4], backend=backend),
                       writer,
                       progress=lambda i, n, done, total, name: seen.append((i, name)))
    assert seen == [(i + 1, n) for i, n in enumerate(names)]
    assert [t.tensor for t in outcome.tensors] == names
    from maskhub.schemas.metadata import MaskMetadata

    writer.finish(MaskMetadata(id="m", name="m", base_model="b", target_model="t",
                               n_params=outcome.n_params, n_updated=outcome.n_updated))
    store = MaskStore(tmp_path / "m.zarr")
    store.validate()
    sweep = {(n, t): c for n, t, c in outcome.sweep}
    for name in names:
        want = updated(base[name], target[name], 1e-5).numpy()
        assert np.array_equal(store.unpacked(name), want), name
        assert sweep[(name, 0.0)] == int(updated(base[name], target[name], 0.0).sum())
        assert sweep[(name, 1e-4)] == int(updated(base[name], target[name], 1e-4).sum())
    stats = {t.tensor: t for t in outcome.tensors}
    assert stats["model.layers.0.mixed.weight"].target_dtype == "float32"
    assert stats["model.layers.0.input_layernorm.weight"].n_updated == 0


def test_pipeline_surfaces_a_writer_failure(tmp_path) -> None:
    from maskhub.checkpoints.pairing import match_tensors
    from maskhub.checkpoints.sources import open_checkpoint
    from maskhub.diff.pipeline import run_diff
    from maskhub.storage.store import MaskWriter

    class FailingWriter(MaskWriter):
        def add(self, stats, packed, values=None):  # noqa: ANN001
            if len(self.names) == 2:
                raise OSError(28, "No space left on device")
            super().add(stats, packed, values)

    _pipeline_pair(tmp_path)
    b_ck, t_ck = open_checkpoint(tmp_path / "base"), open_checkpoint(tmp_path / "target")
    names, _ = match_tensors(b_ck, t_ck, allow_missing=False)
    with pytest.raises(OSError, match="No space left"):
        run_diff(b_ck, t_ck, names, DiffKernel(1e-5), FailingWriter(tmp_path / "m.zarr"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pipeline_matches_cpu(tmp_path) -> None:
    from maskhub.registry.api import Registry

    _pipeline_pair(tmp_path)
    reg = Registry(tmp_path / "home")
    cpu = reg.diff(tmp_path / "base", tmp_path / "target", name="cpu", device="cpu",
                   sweep=[0.0, 1e-4])
    gpu = reg.diff(tmp_path / "base", tmp_path / "target", name="gpu", device="cuda",
                   sweep=[0.0, 1e-4])
    assert gpu.n_updated == cpu.n_updated
    for name in cpu.tensor_names():
        assert np.array_equal(gpu.packed(name), cpu.packed(name)), name
    assert reg.show("gpu")["sweep"] == reg.show("cpu")["sweep"]


def test_cpu_count_honours_the_cgroup_quota(tmp_path: Path) -> None:
    """torch's default pool counts the host's cores; maskhub sizes its threads to the CPUs
    it may use: the affinity mask capped by the cgroup quota (v2, then v1)."""
    from maskhub.kernels.threads import available_cpus, cgroup_quota, torch_threads_for

    assert cgroup_quota(str(tmp_path)) is None
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(str(tmp_path)) is None
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_quota(str(tmp_path)) == 2.5
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))
    assert torch_threads_for(1000) == 1 and torch_threads_for(1 << 24) == available_cpus()


def test_numba_cache_goes_to_the_user_cache_when_site_packages_is_read_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed into a read-only site-packages (and with an unwritable ~/.cache/numba),
    numba would refuse to define the cached kernels; maskhub points its cache at
    $XDG_CACHE_HOME/maskhub/numba instead. A user's NUMBA_CACHE_DIR always wins."""
    numba = pytest.importorskip("numba")
    kernels_dir = Path(fastkernel.__file__).parent
    real = fastkernel._writable_dir
    monkeypatch.setattr(fastkernel, "_writable_dir",
                        lambda p: False if kernels_dir in p.parents else real(p))
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fastkernel.choose_numba_cache() == str(tmp_path / "xdg" / "maskhub" / "numba")
    assert numba.config.CACHE_DIR == str(tmp_path / "xdg" / "maskhub" / "numba")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert fastkernel.choose_numba_cache() == str(tmp_path / "mine")
