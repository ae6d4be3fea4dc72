"""Seeded mutations of safetensors files and Zarr mask stores for tests/test_fuzz_inputs.py,
and a driver that runs them through the maskhub CLI in one process.

Run as a script (``python fuzz_cases.py ROOT SEED N_SAFETENSORS N_ZARR``) it builds the cases
under ROOT, runs each through click's runner (``maskhub diff BASE CASE`` or ``maskhub import
CASE``) with an alarm per case, checks that every mask an exit 0 registered validates, and
prints one JSON object per case. The test runs it under a time limit and an address-space
cap.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import struct
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

W = "model.layers.0.self_attn.q_proj.weight"
B = "model.layers.0.mlp.up_proj.weight"
CASE_SECONDS = 30


class Raw:
    """A JSON token written verbatim (``1e400``, ``-0``...)."""

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(doc: Any) -> bytes:
    """JSON with :class:`Raw` tokens spliced in."""
    raws: list[str] = []

    def default(o: Any) -> str:
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"@@RAW{len(raws) - 1}@@"
        raise TypeError(type(o))
    text = json.dumps(doc, default=default)
    for i, r in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', r)
    return text.encode()


def nested(depth: int) -> Raw:
    """``{"a": {"a": ... "x"}}``, ``depth`` objects deep, as raw JSON (the encoder recurses)."""
    return Raw('{"a": ' * depth + '"x"' + "}" * depth)


@dataclass
class Case:
    """One fuzz case: a label saying what was mutated and the CLI arguments."""

    label: str
    args: list[str]


# -- safetensors ------------------------------------------------------------------------------

SHAPE_VALUES = [-1, -2, 0, 1, 3, 2 ** 31, 2 ** 40, 2 ** 64, Raw("1e400"), Raw("-0"), 1.5, True,
                None, "3", [], Raw("1e2")]
SHAPES = [None, 3, "x", {}, [], [1] * 17, [[2]], [2, 2], [4], [0]]
OFFSETS = [[0], [1, 0], [-4, 0], [0, 2 ** 62], [0.0, 4.0], None, "0,4", [0, 4, 8], [0, 0],
           [Raw("1e400"), 0], [True, 4]]
DTYPES = ["F33", "f32", 5, None, "BOOL", "U8", "F64", "I64", "BF16", "F8_E4M3", ""]
NAMES = ["", "../x", "a" * 5000, "\x1b[31mred", "x\ny", "__metadata__x", "a/b", "é"]
METADATA = [{"a": "b"}, {"a": 1}, [1], "x", None, nested(5), nested(40), nested(2000)]


def _template_header(kind: str) -> tuple[dict, bytes]:
    if kind == "diff":
        a = np.arange(6, dtype=np.float32).tobytes()
        b = np.arange(4, dtype=np.float16).tobytes()
        header = {W: {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                  B: {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]}}
        return header, a + b
    m1 = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1], np.uint8).tobytes()
    m2 = np.array([0, 1] * 5, np.uint8).tobytes()
    header = {W: {"dtype": "BOOL", "shape": [3, 3], "data_offsets": [0, 9]},
              B: {"dtype": "U8", "shape": [10], "data_offsets": [9, 19]}}
    return header, m1 + m2


def write_safetensors(path: Path, header_bytes: bytes, data: bytes,
                      length: int | None = None) -> None:
    n = len(header_bytes) if length is None else length
    path.write_bytes(struct.pack("<Q", n % 2 ** 64) + header_bytes + data)


def mutate_header(rng: random.Random, header: dict, data: bytes) -> tuple[str, Any, bytes]:
    """One mutation of the header dict (or of the document as a whole)."""
    names = [n for n in header if n != "__metadata__"]
    t = rng.choice(names) if names else None
    op = rng.randrange(10)
    if op == 0 and t:
        shape = header[t].get("shape")
        shape = list(shape) if isinstance(shape, list) and shape else [1]
        i = rng.randrange(len(shape))
        shape[i] = rng.choice(SHAPE_VALUES)
        header[t]["shape"] = shape
        return f"shape[{i}]", header, data
    if op == 1 and t:
        header[t]["shape"] = rng.choice(SHAPES)
        return "shape", header, data
    if op == 2 and t:
        choice = rng.randrange(3)
        if choice == 0:
            header[t]["data_offsets"] = rng.choice(OFFSETS)
        elif choice == 1:
            offsets = header[t].get("data_offsets")
            if isinstance(offsets, list) and len(offsets) == 2 and all(
                    type(x) is int for x in offsets):
                d = rng.choice([-1, 1, -8, 8])
                header[t]["data_offsets"] = [max(0, offsets[0] + d), offsets[1] + d]
        else:
            other = rng.choice(names)
            header[t]["data_offsets"] = header[other].get("data_offsets")
        return "offsets", header, data
    if op == 3 and t:
        header[t]["dtype"] = rng.choice(DTYPES)
        return "dtype", header, data
    if op == 4 and t:
        header[t].pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
        return "missing-key", header, data
    if op == 5 and t:
        header[rng.choice(NAMES)] = header.pop(t)
        return "name", header, data
    if op == 6:
        header["__metadata__"] = rng.choice(METADATA)
        return "metadata", header, data
    if op == 7 and t:
        header[f"zero{rng.randrange(9)}"] = {"dtype": "F32", "shape": [0],
                                             "data_offsets": [0, 0]}
        header[t]["extra"] = {"x": [1]}
        return "extra-entries", header, data
    if op == 8:
        return "top-level", rng.choice([[], "x", 1, None, [header]]), data
    if rng.random() < 0.5:  # values only: a valid file, a different mask
        flipped = bytearray(data)
        flipped[rng.randrange(len(flipped))] ^= 1
        return "values", header, bytes(flipped)
    return "data", header, data[:rng.randrange(len(data) + 1)] + bytes(rng.randrange(3))


def safetensors_case(rng: random.Random, root: Path, i: int, kind: str, base: Path) -> Case:
    header, data = _template_header(kind)
    labels = []
    doc: Any = header
    for _ in range(rng.choice([1, 1, 2, 3])):
        if not isinstance(doc, dict):
            break
        label, doc, data = mutate_header(rng, doc, data)
        labels.append(label)
    text = dumps(doc)
    length = None
    path = root / f"st{i}.safetensors"
    byte_op = rng.randrange(8)
    if byte_op == 0:
        length = rng.choice([0, 1, len(text) - 1, len(text) + 1, len(text) + len(data) + 8,
                             2 ** 63, 2 ** 64 - 1])
        labels.append("length")
    elif byte_op == 1 and text:
        raw = bytearray(text)
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] = rng.choice(b'{}[]",:0-9e\x00\xff')
        text = bytes(raw)
        labels.append("flip")
    write_safetensors(path, text, data, length)
    if byte_op == 2:
        full = path.read_bytes()
        path.write_bytes(full[:rng.randrange(len(full))])
        labels.append("truncate")
    label = f"safetensors/{kind}: {'+'.join(labels)}"
    if kind == "diff":
        return Case(label, ["diff", str(base), str(path), "--name", f"st{i}"])
    return Case(label, ["import", str(path), "--base-model", "org/b", "--name", f"st{i}"])


# -- Zarr stores ------------------------------------------------------------------------------


def template_store(path: Path) -> Path:
    """A valid hand-written mask store: ``W`` packed uint8 (16 entries, two 1-byte chunks),
    ``B`` a bool array (3, 5) in two chunk rows."""
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.attrs.update({"base_model": "org/base-7b", "n_params": 31, "n_updated": 12})
    a = g.create_array(W, shape=(2,), chunks=(1,), dtype="uint8")
    a[:] = np.array([0b1011, 0b11000], np.uint8)
    a.attrs.update({"shape": [4, 4], "bitorder": "little", "numel": 16, "n_updated": 5})
    b = g.create_array(B, shape=(3, 5), chunks=(2, 5), dtype=bool)
    b[:] = np.array([[1, 0, 1, 0, 1], [0, 0, 0, 1, 1], [1, 1, 0, 0, 0]], bool)
    return path


ARRAY_FIELDS: dict[str, list[Any]] = {
    "shape": [[-1], [2 ** 30], [2 ** 40], [Raw("1e400")], [0], [3], "x", [1, 1], [2 ** 20]],
    "data_type": ["float32", "bool", "uint8", "int64", None],
    "fill_value": [1, True, None, "x", 0],
    "codecs": [[], [{"name": "unknown"}], [{"name": "bytes"}], None, "zstd"],
    "zarr_format": [2, "3", None],
    "node_type": ["group", None],
    "chunk_key_encoding": [{"name": "v2"}, {"name": "default", "configuration":
                                           {"separator": "."}}, None, {"name": "x"}],
    "storage_transformers": [[{"name": "x"}], None],
}
CHUNK_SHAPES = [[0], [-1], [2 ** 40], [1], [3], [1, 1], None, [Raw("1e400")]]
ATTR_FIELDS: dict[str, list[Any]] = {
    "shape": [[-1], [17], [2 ** 40], "x", [4, Raw("1e400")], [], [2 ** 33]],
    "numel": [-1, 15, 2 ** 40, 1.5, None],
    "n_updated": [-5, 0, 999, True, 6, None],
    "bitorder": ["middle", None, "big"],
}
GROUP_FIELDS: dict[str, list[Any]] = {
    "n_params": [-1, 0, 2 ** 70, "many"],
    "n_updated": [-5, 13, 1.5],
    "tensors": [["../x"], [1], "x", [W, W], [W], []],
    "kind": ["x", None],
    "format_version": [99, "1", -1],
    "base_model": [None, "", 5, "a" * 300],
    "name": ["a" * 100_000, "-x", 5],
    "notes": [nested(2000), "\x1b[31m"],
}


@functools.cache
def _bomb() -> bytes:
    """A zstd frame of 64 MiB of zeros (a few KB): decompresses to far more than a chunk."""
    from numcodecs import Zstd

    return bytes(Zstd(level=1).encode(np.zeros(64 << 20, np.uint8)))


def _own(store: Path, p: Path, *, link_ok: bool = False) -> Path:
    """``p`` if it lies in ``store`` (its directory resolved) and is not a symlink (unless
    ``link_ok``, for removing the link itself): the mutations never write through a link
    that an earlier mutation planted, so nothing outside the case directory is touched."""
    root = os.path.realpath(store)
    parent = os.path.realpath(p.parent)
    if not (parent == root or parent.startswith(root + os.sep)):
        raise ValueError(f"{p} is outside the store")
    if p.is_symlink() and not link_ok:
        raise ValueError(f"{p} is a symlink")
    return p


def _edit_json(store: Path, path: Path, fn) -> None:
    doc = json.loads(_own(store, path).read_text())
    _own(store, path).write_bytes(dumps(fn(doc)))


def mutate_store(rng: random.Random, store: Path, outside: Path, last: bool) -> str:
    """One mutation of a copied template store; returns its label. Links and FIFOs are only
    planted by the ``last`` mutation of a case, and every write goes through :func:`_own`."""
    arr = rng.choice([W, B])
    adir = _own(store, store / arr)
    op = rng.randrange(12 if last else 7)
    if op == 11 or (op == 10 and not last):
        _edit_json(store, adir / "zarr.json", lambda d: {**d, "attributes": {
            **{k: v for k, v in d.get("attributes", {}).items() if k != "n_updated"},
            "origin": "elsewhere"}})  # benign: counts left for maskhub to compute
        return "benign"
    if op == 0:
        key = rng.choice(list(ARRAY_FIELDS))
        value = rng.choice(ARRAY_FIELDS[key])
        _edit_json(store, adir / "zarr.json", lambda d: {**d, key: value})
        return f"array.{key}"
    if op == 1:
        value = rng.choice(CHUNK_SHAPES)
        _edit_json(store, adir / "zarr.json", lambda d: {**d, "chunk_grid": {
            "name": "regular", "configuration": {"chunk_shape": value}}})
        return "array.chunk_shape"
    if op == 2:
        key = rng.choice(list(ATTR_FIELDS))
        value = rng.choice(ATTR_FIELDS[key])
        _edit_json(store, adir / "zarr.json",
                   lambda d: {**d, "attributes": {**d.get("attributes", {}), key: value}})
        return f"array.attrs.{key}"
    if op == 3:
        key = rng.choice(list(GROUP_FIELDS))
        value = rng.choice(GROUP_FIELDS[key])
        _edit_json(store, store / "zarr.json",
                   lambda d: {**d, "attributes": {**d["attributes"], key: value}})
        return f"group.{key}"
    if op == 4:
        target = _own(store, rng.choice([store / "zarr.json", adir / "zarr.json"]))
        target.write_bytes(rng.choice([b"", b"{", b"[]", b"null", b"\xff\xfe",
                                       b'{"a": ' * 3000 + b"1" + b"}" * 3000]))
        return "json-garbage"
    chunks = sorted(p for p in adir.rglob("*") if p.is_file() and not p.is_symlink()
                    and p.name != "zarr.json")
    chunk = _own(store, rng.choice(chunks) if chunks else adir / "c" / "0")
    chunk.parent.mkdir(parents=True, exist_ok=True)
    if op == 5:
        from numcodecs import Zstd

        choice = rng.randrange(5)
        if choice == 0:
            chunk.write_bytes(chunk.read_bytes()[: rng.randrange(8)])
        elif choice == 1:
            chunk.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
        elif choice == 2:
            chunk.write_bytes(b"")
        elif choice == 3:  # decompresses to far more than a chunk
            chunk.write_bytes(_bomb())
        else:
            chunk.write_bytes(Zstd(level=1).encode(np.full(3, 255, np.uint8)))
        return "chunk-bytes"
    if op == 6:
        chunk.unlink(missing_ok=True)
        return "chunk-deleted"
    if op == 7:
        chunk.unlink(missing_ok=True)
        target = rng.choice(["/etc/passwd", "/dev/zero", str(outside), str(outside.parent),
                             "../0" if chunk.name != "0" else "1", "nowhere"])
        chunk.symlink_to(target)
        shown = target if target in ("/etc/passwd", "/dev/zero") else "other"
        return f"chunk-symlink:{shown}"
    if op == 8:
        victim = _own(store, rng.choice([chunk, adir / "zarr.json", store / "zarr.json"]))
        victim.unlink(missing_ok=True)
        os.mkfifo(victim)
        return f"fifo:{victim.name}"
    if op == 9:
        chunk.unlink(missing_ok=True)
        chunk.mkdir()
        return "chunk-is-dir"
    shutil.rmtree(adir)
    adir.symlink_to(outside.parent / "decoy")  # a copy of an array, outside the store
    return "array-dir-symlink"


def zarr_case(rng: random.Random, root: Path, i: int, template: Path, outside: Path) -> Case:
    store = root / f"z{i}.zarr"
    shutil.copytree(template, store, symlinks=True)
    labels = []
    n = rng.choice([1, 1, 2])
    for k in range(n):
        try:
            labels.append(mutate_store(rng, store, outside, last=k == n - 1))
        except (OSError, ValueError, KeyError, TypeError, RecursionError):  # broken before
            labels.append("(skipped)")
    return Case(f"zarr: {'+'.join(labels)}", ["import", str(store), "--name", f"z{i}"])


def build(root: Path, seed: int, n_safetensors: int, n_zarr: int) -> list[Case]:
    """The cases of one seed, their files written under ``root``."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    header, data = _template_header("diff")
    base = root / "base.safetensors"
    write_safetensors(base, dumps(header), data)
    outside = root / "outside.bin"
    outside.write_bytes(b"\x01" * 64)
    template = template_store(root / "template.zarr")
    shutil.copytree(template / W, root / "decoy")
    cases = [safetensors_case(rng, root, i, rng.choice(["diff", "import"]), base)
             for i in range(n_safetensors)]
    cases += [zarr_case(rng, root, i, template, outside) for i in range(n_zarr)]
    return cases


# -- the in-process driver --------------------------------------------------------------------


def _alarm(signum: int, frame: Any) -> None:
    raise TimeoutError(f"case took over {CASE_SECONDS} s")


def check_registered(name: str) -> str | None:
    """None when the mask ``name`` is registered and its store validates, else why not."""
    from maskhub import Registry

    try:
        mask = Registry().get(name)
        mask.store.validate()
        if mask.n_params < 0 or not 0 <= mask.n_updated <= mask.n_params:
            return f"registered with counts {mask.n_params}/{mask.n_updated}"
    except Exception as exc:  # noqa: BLE001 (reported, not raised)
        return f"exit 0 but the mask does not validate: {type(exc).__name__}: {exc}"
    return None


def run_case(case: Case) -> dict[str, Any]:
    """Run one case through click's runner; the outcome as a plain dict."""
    from click.testing import CliRunner

    from maskhub.cli import main

    t0 = time.perf_counter()
    signal.alarm(CASE_SECONDS)
    try:
        res = CliRunner().invoke(main, case.args)
        code, stderr = res.exit_code, res.stderr
        exc = res.exception
        problem = None
        if exc is not None and not isinstance(exc, SystemExit):
            problem = "".join(traceback.format_exception(exc))[-2000:]
    except TimeoutError as exc:
        code, stderr, problem = -1, "", f"hang: {exc}"
    finally:
        signal.alarm(0)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if problem is None and code == 0:
        problem = check_registered(case.args[case.args.index("--name") + 1])
    elif problem is None and not (code == 1 and len(lines) == 1
                                  and lines[0].startswith("Error: ")):
        problem = f"exit {code} with stderr {stderr[-1000:]!r}"
    return {"label": case.label, "args": case.args, "exit": code, "line": lines[-1][:300]
            if lines else "", "problem": problem,
            "seconds": round(time.perf_counter() - t0, 3)}


def main(argv: list[str]) -> None:
    """``fuzz_cases.py ROOT SEED N_SAFETENSORS N_ZARR``: build and run; JSON lines out."""
    root, seed, n_st, n_z = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    os.environ["MASKHUB_HOME"] = str(root / "home")
    signal.signal(signal.SIGALRM, _alarm)
    for case in build(root, seed, n_st, n_z):
        print(json.dumps(run_case(case)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
