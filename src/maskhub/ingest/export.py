"""``maskhub export``: a registered mask as one ``.safetensors`` file, for tools that do not
read Zarr (the inverse of ``maskhub import`` for the ``bool`` layout).

Two layouts, named in the file's ``__metadata__`` (``"layout"``):

* ``bool`` (default): one ``BOOL`` tensor per parameter, with the parameter's name and shape
  (``safetensors.torch.load_file`` gives boolean masks; ``maskhub import`` reads it back);
* ``packed``: one ``U8`` tensor per parameter holding ``ceil(numel / 8)`` bytes, the
  flattened mask packed in ``little`` bit order (``np.unpackbits(a, count=numel,
  bitorder="little").reshape(shape)``), the shapes in ``__metadata__["shapes"]`` (JSON).

The file is written tensor by tensor (a header computed from the recorded shapes, then each
tensor's bytes), so memory holds one tensor's mask at a time; written aside, then renamed.
``__metadata__`` also carries the mask's name, id, base and target models and fingerprints,
tolerance and ``format`` = ``"maskhub.mask"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from maskhub.core.record import MaskRecord
from maskhub.errors import UsageError

LAYOUTS = ("bool", "packed")


def export(mask: MaskRecord, out: str | os.PathLike[str], layout: str = "bool") -> Path:
    """Write ``mask`` to ``out`` (a ``.safetensors`` path) in ``layout``; return the path."""
    import numpy as np

    if layout not in LAYOUTS:
        raise UsageError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    path = Path(out)
    if path.suffix != ".safetensors":
        raise UsageError(f"{path} must end in .safetensors")
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: {path.parent} is not a directory")
    stats = mask.tensor_stats()
    header: dict[str, dict] = {}
    offset = 0
    for s in stats:
        size = s.numel if layout == "bool" else (s.numel + 7) // 8
        shape = list(s.shape) if layout == "bool" else [size]
        header[s.tensor] = {"dtype": "BOOL" if layout == "bool" else "U8", "shape": shape,
                            "data_offsets": [offset, offset + size]}
        offset += size
    row = mask.row
    meta = {"format": "maskhub.mask", "layout": layout, "bitorder": "little",
            "name": mask.name, "id": mask.id, "base_model": row.get("base_model"),
            "target_model": row.get("target_model"), "tol": repr(row.get("tol")),
            "base_fingerprint": row.get("base_fingerprint"),
            "target_fingerprint": row.get("target_fingerprint")}
    if layout == "packed":
        meta["shapes"] = json.dumps({s.tensor: list(s.shape) for s in stats})
    header["__metadata__"] = {k: str(v) for k, v in meta.items() if v is not None}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    aside = path.with_name(path.name + ".partial")
    try:
        with open(aside, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for s in stats:
                packed = mask.packed(s.tensor)
                if layout == "packed":
                    f.write(np.ascontiguousarray(packed[:(s.numel + 7) // 8]).tobytes())
                    continue
                bits = np.unpackbits(packed, count=s.numel, bitorder="little")
                f.write(bits.astype(np.bool_).tobytes())
        os.replace(aside, path)
    except OSError as exc:
        aside.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        aside.unlink(missing_ok=True)
        raise
    return path
