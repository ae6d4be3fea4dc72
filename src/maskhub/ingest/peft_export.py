"""``maskhub export MASK DIR --peft``: a mask as a SHiRA adapter in PEFT's own on-disk format,
loadable with plain ``PeftModel.from_pretrained(base, DIR)`` in a process without maskhub.

PEFT's SHiRA (``peft.ShiraConfig``, peft >= 0.17) gives every adapted ``nn.Linear`` of an
``m x n`` weight exactly ``r * (m + n)`` trainable entries (one ``r`` per adapter): on load it
creates each layer's ``shira_weight`` at that size, then reads the file's
``shira_indices`` (``(2, k)`` int32, ``(row, column)``) and ``shira_weight`` (``k`` float32)
into it. A mask has its own count per layer, so the export:

* takes one ``r = max over layers of ceil(k / (m + n))`` (at least 1), so that every layer's
  ``r * (m + n)`` slots hold its ``k`` entries;
* pads each layer's slots with copies of its own entries, round-robin (entry ``j`` of the
  padding repeats entry ``j mod k``): the set of distinct ``(row, column)`` positions is
  exactly the mask's, no entry outside the mask is trainable;
* writes every weight as 0.0 (the merged adapter is the base model until trained).

Copies of a position add up (the delta is a sparse COO sum): a position with ``c`` copies
moves ``c`` times as fast under SGD or Adam as under gradient masking; the export reports
the largest ``c`` per layer. Training with the mask's exact per-layer counts needs maskhub
(:func:`maskhub.integrations.peft.load_shira_adapter` reads this adapter too).

Only 2-D ``*.weight`` tensors with updated entries become SHiRA layers (module name = the
tensor name without ``.weight``), except those matching ``exclude`` (default: embedding
names, which PEFT cannot adapt with SHiRA); a layer whose ``r * (m + n)`` would exceed
``m * n`` (PEFT refuses it) is an error naming it. Masked entries of the other tensors
(norms, biases, embeddings) are not in the adapter: the result says how many.

``adapter_config.json`` holds PEFT's SHiRA fields; ``mask_type`` records the mask
(``maskhub:{"id":..,"name":..}``, as :func:`maskhub.integrations.peft.adapter_mask_info`
reads it; PEFT needs no mask function since the indices come from the file). Written
tensor by tensor with numpy (no torch, no peft needed to export) under ``*.partial`` names,
then renamed (the weights first, the config last).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from maskhub.core.record import MaskRecord
from maskhub.errors import UsageError
from maskhub.hub.layout import is_hub_repo_id
from maskhub.schemas.names import PEFT_EXCLUDE

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SAVED_PREFIX = "base_model.model."
MASK_TYPE_PREFIX = "maskhub:"


@dataclass
class PeftExport:
    """What :func:`export_peft` wrote."""

    path: Path
    r: int
    #: ``{module name: (mask entries, slots r*(m+n), largest copies of one position)}``.
    layers: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    #: ``{tensor: (masked entries, why it is not in the adapter)}``.
    left_out: dict[str, tuple[int, str]] = field(default_factory=dict)
    bytes: int = 0

    @property
    def n_adapted(self) -> int:
        """Masked entries the adapter holds (distinct positions)."""
        return sum(k for k, _, _ in self.layers.values())

    @property
    def n_left_out(self) -> int:
        """Masked entries of tensors the adapter does not cover."""
        return sum(n for n, _ in self.left_out.values())

    def to_dict(self) -> dict:
        """JSON-ready summary (``maskhub export --peft --json``)."""
        return {"path": str(self.path), "r": self.r, "bytes": self.bytes,
                "n_adapted": self.n_adapted, "n_left_out": self.n_left_out,
                "layers": {n: {"entries": k, "slots": s, "max_copies": c}
                           for n, (k, s, c) in self.layers.items()},
                "left_out": {n: {"entries": k, "why": w}
                             for n, (k, w) in self.left_out.items()}}


def _config(mask: MaskRecord, r: int, modules: list[str]) -> dict:
    row = mask.row
    identity = {k: row.get(k) for k in ("id", "name", "hub_repo", "hub_revision")}
    mask_type = MASK_TYPE_PREFIX + json.dumps({k: v for k, v in identity.items() if v},
                                              sort_keys=True, separators=(",", ":"))
    base = row.get("base_model") if is_hub_repo_id(row.get("base_model")) else None
    return {"base_model_name_or_path": base,
            "fan_in_fan_out": False, "inference_mode": True, "init_weights": True,
            "mask_type": mask_type, "modules_to_save": None, "peft_type": "SHIRA",
            "r": r, "random_seed": None,
            "revision": row.get("base_revision") if base else None,
            "target_modules": modules, "task_type": None}


def export_peft(mask: MaskRecord, out: str | os.PathLike[str],
                exclude: str | None = PEFT_EXCLUDE) -> PeftExport:
    """Write ``mask`` as a plain-PEFT SHiRA adapter in directory ``out`` (created; it must
    not hold an adapter already); ``exclude``: a regex (``re.search`` on tensor names) of 2-D
    weights to leave out, None for none."""
    import numpy as np

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} is a file: --peft writes a directory (adapter_config.json, "
                         "adapter_model.safetensors)")
    if (path / CONFIG_FILE).exists() or (path / WEIGHTS_FILE).exists():
        raise UsageError(f"{path} already holds an adapter: remove it or pick another "
                         "directory")
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: {path.parent} is not a directory")
    try:
        pattern = re.compile(exclude) if exclude else None
    except re.error as exc:
        raise UsageError(f"--exclude is not a valid regular expression: {exc}") from None
    result = PeftExport(path=path, r=1)
    chosen = []
    for s in mask.tensor_stats():
        if not s.n_updated:
            continue
        if len(s.shape) != 2 or not s.tensor.endswith(".weight"):
            result.left_out[s.tensor] = (s.n_updated, "not a 2-D weight")
        elif pattern is not None and pattern.search(s.tensor):
            result.left_out[s.tensor] = (s.n_updated, "excluded (an embedding?)")
        elif min(s.shape) < 2:
            result.left_out[s.tensor] = (s.n_updated, f"{s.shape[0]}x{s.shape[1]}")
        else:
            chosen.append(s)
    if not chosen:
        raise UsageError(f"{mask.name} marks no entry of a 2-D weight SHiRA can adapt: "
                         "there is nothing for a PEFT adapter to hold")
    r = max(1, *(-(-s.n_updated // (s.shape[0] + s.shape[1])) for s in chosen))
    too_dense = [f"{s.tensor} ({s.shape[0]}x{s.shape[1]} < {r}*{sum(s.shape)})"
                 for s in chosen if r * (s.shape[0] + s.shape[1]) > s.shape[0] * s.shape[1]]
    if too_dense:
        raise UsageError(
            f"PEFT's SHiRA gives every layer r*(m+n) entries with one r; this mask needs "
            f"r={r}, more entries than {len(too_dense)} layer(s) hold: "
            + ", ".join(too_dense[:5]) + (" ..." if len(too_dense) > 5 else "")
            + " (leave them out with --exclude REGEX)")
    result.r = r
    header: dict[str, dict] = {}
    offset = 0
    for s in chosen:
        module = s.tensor[: -len(".weight")]
        slots = r * (s.shape[0] + s.shape[1])
        header[SAVED_PREFIX + module + ".shira_indices"] = {
            "dtype": "I32", "shape": [2, slots], "data_offsets": [offset, offset + 8 * slots]}
        offset += 8 * slots
        header[SAVED_PREFIX + module + ".shira_weight"] = {
            "dtype": "F32", "shape": [slots], "data_offsets": [offset, offset + 4 * slots]}
        offset += 4 * slots
        result.layers[module] = (s.n_updated, slots, -(-slots // s.n_updated))
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    created = not path.exists()
    weights = path / (WEIGHTS_FILE + ".partial")
    try:
        path.mkdir(exist_ok=True)
        with open(weights, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for s in chosen:
                _, slots, _ = result.layers[s.tensor[: -len(".weight")]]
                bits = np.unpackbits(mask.packed(s.tensor), count=s.numel, bitorder="little")
                flat = np.flatnonzero(bits)
                if flat.size != s.n_updated:
                    raise UsageError(f"{mask.name}: {s.tensor} holds {flat.size} set bits, "
                                     f"its recorded count is {s.n_updated} (run maskhub fsck)")
                flat = flat[np.arange(slots) % flat.size]  # padded with copies, round-robin
                rows, cols = np.divmod(flat, s.shape[1])
                f.write(np.stack([rows, cols]).astype("<i4").tobytes())
                f.write(np.zeros(slots, dtype="<f4").tobytes())
        config = path / (CONFIG_FILE + ".partial")
        config.write_text(json.dumps(_config(mask, r, sorted(result.layers)), indent=2,
                                     sort_keys=True) + "\n")
        os.replace(weights, path / WEIGHTS_FILE)  # the weights first: the config marks it done
        os.replace(config, path / CONFIG_FILE)
    except BaseException as exc:
        for leftover in (weights, path / (CONFIG_FILE + ".partial"), path / WEIGHTS_FILE):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
        if created:
            shutil.rmtree(path, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    result.bytes = sum((path / n).stat().st_size for n in (WEIGHTS_FILE, CONFIG_FILE))
    return result
