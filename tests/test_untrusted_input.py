"""Issue 21, items 3: hostile metadata, one class at a time, through the CLI. Every case ends
in exit 1 with one exact ``Error:`` line (or registers a valid mask in bounded memory), never
a traceback, a hang or an allocation from a declared shape. The one validator is
:mod:`maskhub.checkpoints.validate`; fuzzing over the same classes is tests/test_fuzz_inputs.py.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
import zarr
from clitools import fail_line

from maskhub import MaskStoreError, Registry

W = "model.layers.0.mlp.up_proj.weight"
DATA = np.arange(4, dtype=np.float32).tobytes()
GOOD = {W: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
#: Most a hostile input may add to the peak RSS of the same command on an honest input.
RSS_SLACK_MB = 200


def write_safetensors(path: Path, header: dict | None = None, data: bytes = DATA, *,
                      raw: bytes | None = None, length: int | None = None) -> Path:
    """A safetensors file with exactly this header (``raw``: its JSON bytes verbatim)."""
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def entry(shape: object, offsets: object = (0, 16), dtype: object = "F32") -> dict:
    return {W: {"dtype": dtype, "shape": shape, "data_offsets": list(offsets)}}


def assert_nothing_registered(home: Path) -> None:
    assert Registry(home).ls() == []
    for sub in ("masks", "tmp"):
        assert not (home / sub).exists() or list((home / sub).iterdir()) == []


def run_maskhub(args: list[str], home: Path, timeout: float = 120) -> tuple[int, str, int]:
    """``maskhub ARGS`` in a fresh process; returns (exit code, stderr, peak RSS in MB)."""
    probe = ("import resource, sys\nfrom maskhub.cli import main\ncode = 0\n"
             "try:\n    main(sys.argv[1:], prog_name='maskhub')\n"
             "except SystemExit as e:\n    code = e.code or 0\n"
             "sys.stderr.write(f'\\nRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}')\n"
             "sys.exit(code)\n")
    env = {**os.environ, "MASKHUB_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-c", probe, *args], env=env, text=True,
                          capture_output=True, timeout=timeout)
    err, _, rss = proc.stderr.rpartition("\nRSS ")
    return proc.returncode, err.strip(), int(rss) // 1024


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write_safetensors(tmp_path / "base.safetensors", GOOD)


# -- safetensors headers -----------------------------------------------------------------------


@pytest.mark.parametrize(("header", "raw", "message"), [
    (entry([-1], (4, 0)), None, "tensor 'model.layers.0.mlp.up_proj.weight': its shape [-1] "
     "holds -1, not a non-negative integer"),
    (None, b'{"%s": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 16]}}' % W.encode(),
     "tensor 'model.layers.0.mlp.up_proj.weight': its shape [inf] holds inf, not a "
     "non-negative integer"),
    (entry([-2]), None, "tensor 'model.layers.0.mlp.up_proj.weight': its shape [-2] holds -2, "
     "not a non-negative integer"),
    (entry([2.0, 2]), None, "its shape [2.0, 2] holds 2.0, not a non-negative integer"),
    (entry([True, 4]), None, "its shape [True, 4] holds True, not a non-negative integer"),
    (entry([2 ** 40, 2 ** 40]), None, "its shape [1099511627776, 1099511627776] has "
     "1208925819614629174706176 entries (at most 68719476736)"),
    (entry([4], dtype="F31"), None, "has unknown dtype 'F31'"),
    (entry([2, 2], (0, 2.5)), None, "has data_offsets [0, 2.5]; they must be [begin, end]"),
    (entry([2, 2], (8, 24)), None, "is truncated: tensor 'model.layers.0.mlp.up_proj.weight' "
     "ends at byte 24 of a 16-byte data section"),
    ({**entry([2], (0, 8)), "b": {"dtype": "F32", "shape": [3], "data_offsets": [4, 16]}}, None,
     "tensors 'model.layers.0.mlp.up_proj.weight' and 'b' overlap in the data section"),
    ({"__metadata__": {"a": {"b": "c"}}, **GOOD}, None,
     "its __metadata__ is not a flat object of strings"),
    (None, b'{"__metadata__": ' + b'{"a": ' * 1000 + b'"x"' + b"}" * 1000 + b"}",
     "its header nests JSON 1001 levels deep (a safetensors header has 3)"),
], ids=["negative", "1e400", "minus-2", "float", "bool", "huge", "dtype", "float-offset",
        "outside", "overlap", "metadata-nested", "depth-1000"])
def test_hostile_header_is_one_line(base: Path, tmp_path: Path, maskhub_home: Path,
                                    header: dict | None, raw: bytes | None,
                                    message: str) -> None:
    bad = write_safetensors(tmp_path / "bad.safetensors", header, raw=raw)
    line = fail_line("diff", str(base), str(bad))
    assert line.startswith(f"Error: {bad}") and message in line, line
    assert_nothing_registered(maskhub_home)
    # The same reader serves import (a safetensors file of masks) and verify.
    assert message in fail_line("import", str(bad), "--base-model", "org/b")


def test_header_length_out_of_range(base: Path, tmp_path: Path) -> None:
    bad = write_safetensors(tmp_path / "bad.safetensors", GOOD, length=1 << 62)
    n = bad.stat().st_size
    assert fail_line("diff", str(base), str(bad)) == (
        f"Error: {bad} is not a readable safetensors file: header length {1 << 62} is out of "
        f"range for a {n}-byte file (truncated or not safetensors)")


def test_200k_zero_size_tensors_refused_fast(base: Path, tmp_path: Path,
                                            maskhub_home: Path) -> None:
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
              for i in range(200_000)}
    bad = write_safetensors(tmp_path / "many.safetensors", header, b"")
    t0 = time.perf_counter()
    line = fail_line("diff", str(base), str(bad))
    took = time.perf_counter() - t0
    assert line == (f"Error: {bad}: its header declares about 200000 tensors (at most 100000 "
                    "per file)")
    assert took < 15, took  # ~0.3 s alone; generous for a loaded CI machine
    assert_nothing_registered(maskhub_home)


def test_fifo_checkpoint_never_blocks(base: Path, tmp_path: Path, maskhub_home: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    code, err, _ = run_maskhub(["diff", str(base), str(fifo)], maskhub_home, timeout=120)
    assert (code, err) == (1, f"Error: {fifo} is a FIFO, not a regular file")
    code, err, _ = run_maskhub(["diff", str(base), str(tmp_path)], maskhub_home, timeout=120)
    assert (code, err) == (1, f"Error: {fifo} is a FIFO, not a regular file")
    assert_nothing_registered(maskhub_home)


def test_index_naming_a_shard_outside_its_directory(base: Path, tmp_path: Path) -> None:
    ck = tmp_path / "sharded"
    ck.mkdir()
    (ck / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {W: "../base.safetensors"}}))
    assert fail_line("diff", str(base), str(ck)) == (
        f"Error: {ck / 'model.safetensors.index.json'} names shard '../base.safetensors', "
        "which is not a file of its directory")


# -- Zarr stores (import) ---------------------------------------------------------------------


def packed_store(path: Path, *, chunks: int = 1) -> Path:
    """A hand-written mask store: ``W`` packed (16 entries, 5 set) in 2-byte... 1-byte chunks."""
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.attrs.update({"base_model": "org/base-7b"})
    a = g.create_array(W, shape=(2,), chunks=(chunks,), dtype="uint8")
    a[:] = np.array([0b1011, 0b11000], np.uint8)
    a.attrs.update({"shape": [4, 4], "bitorder": "little", "numel": 16, "n_updated": 5})
    return path


def edit_array_json(store: Path, fn) -> None:
    p = store / W / "zarr.json"
    doc = json.loads(p.read_text())
    fn(doc)
    p.write_text(json.dumps(doc))


def test_a_good_store_imports(tmp_path: Path) -> None:
    store = packed_store(tmp_path / "m.zarr")
    Registry().add(store, name="ok")
    assert Registry().get("ok").n_updated == 5


@pytest.mark.parametrize("target", ["/etc/passwd", "/dev/zero"])
def test_chunk_symlink_leaving_the_store(tmp_path: Path, maskhub_home: Path,
                                         target: str) -> None:
    store = packed_store(tmp_path / "m.zarr")
    chunk = store / W / "c" / "0"
    chunk.unlink()
    chunk.symlink_to(target)
    assert fail_line("import", str(store)) == (
        f"Error: m.zarr/{W}/c/0 is a symlink that leaves the store (to {target!r}); "
        "refusing it")
    assert_nothing_registered(maskhub_home)


def test_fifo_chunk_never_blocks(tmp_path: Path, maskhub_home: Path) -> None:
    store = packed_store(tmp_path / "m.zarr")
    chunk = store / W / "c" / "0"
    chunk.unlink()
    os.mkfifo(chunk)
    code, err, _ = run_maskhub(["import", str(store)], maskhub_home)
    assert (code, err) == (1, f"Error: m.zarr/{W}/c/0 is a FIFO, not a regular file")
    assert_nothing_registered(maskhub_home)


def test_decompression_bomb_chunk_is_refused_before_decoding(tmp_path: Path,
                                                             maskhub_home: Path) -> None:
    from numcodecs import Zstd

    store = packed_store(tmp_path / "m.zarr")
    (store / W / "c" / "0").write_bytes(Zstd(level=1).encode(np.zeros(64 << 20, np.uint8)))
    assert fail_line("import", str(store)) == (
        f"Error: m.zarr: array {W!r} chunk c/0 is a zstd frame that declares 67108864 bytes; "
        "a chunk of this array decodes to 1")
    assert_nothing_registered(maskhub_home)


def test_fifo_or_link_in_a_registered_store_never_blocks(tmp_path: Path,
                                                         maskhub_home: Path) -> None:
    """A store edited after registration: its readers (overlap, training, show...) refuse a
    chunk that became a FIFO or a link out of the store, in one line."""
    Registry().add(packed_store(tmp_path / "m.zarr"), name="m")
    chunk = Registry().get("m").path / W / "c" / "0"
    chunk.unlink()
    os.mkfifo(chunk)
    probe = ("from maskhub import Registry, MaskhubError\n"
             f"try:\n    Registry().get('m').packed({W!r})\n"
             "except MaskhubError as e:\n    print(e)\n")
    env = {**os.environ, "MASKHUB_HOME": str(maskhub_home)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, text=True,
                         capture_output=True, timeout=120)
    store = Registry().get("m").path
    assert out.stdout.strip() == f"{store}: array {W!r} chunk c/0 is a FIFO, not a regular file"
    chunk.unlink()
    chunk.symlink_to("/dev/zero")
    with pytest.raises(MaskStoreError) as err:
        Registry().get("m").packed(W)
    assert str(err.value) == (f"{store}: array {W!r} chunk c/0 is a symlink that leaves the "
                              "store (to '/dev/zero'); refusing it")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.__setitem__("shape", [2 ** 40]),
     "has a bad zarr.json: its shape [1099511627776] has 1099511627776 entries (at most "
     "68719476736)"),
    (lambda d: d.__setitem__("shape", [-1]),
     "has a bad zarr.json: its shape [-1] holds -1, not a non-negative integer"),
    (lambda d: d["attributes"].__setitem__("n_updated", -5),
     "has n_updated -5, not a non-negative integer"),
    (lambda d: d["attributes"].__setitem__("numel", -1),
     "has numel -1, not a non-negative integer"),
    (lambda d: d["attributes"].__setitem__("n_updated", 17),
     "has n_updated 17 but only 16 entries"),
    (lambda d: d.__setitem__("data_type", "float64"),
     "has data_type 'float64'; a mask array is bool or uint8"),
    (lambda d: d["chunk_grid"]["configuration"].__setitem__("chunk_shape", [0]),
     "has chunk grid {'name': 'regular', 'configuration': {'chunk_shape': [0]}}; a regular "
     "grid of positive chunk sizes, one per dimension, is read"),
    (lambda d: d.__setitem__("fill_value", 1), "has fill_value 1; a mask array's is 0/false"),
], ids=["shape-2^40", "shape-negative", "n_updated-5", "numel-1", "n_updated-over",
        "dtype", "chunk-0", "fill"])
def test_hostile_array_metadata(tmp_path: Path, maskhub_home: Path, edit,
                                message: str) -> None:
    store = packed_store(tmp_path / "m.zarr")
    edit_array_json(store, edit)
    assert fail_line("import", str(store)) == f"Error: m.zarr: array {W!r} {message}"
    assert_nothing_registered(maskhub_home)


def test_deep_group_metadata(tmp_path: Path, maskhub_home: Path) -> None:
    store = packed_store(tmp_path / "m.zarr")
    (store / "zarr.json").write_text('{"attributes": ' + '{"a": ' * 1000 + "1" + "}" * 1001)
    assert fail_line("import", str(store)) == (
        "Error: m.zarr/zarr.json nests JSON 1001 levels deep (at most 32 are read)")


def test_declared_2_30_bytes_without_chunks_reads_in_bounded_memory(
        tmp_path: Path, maskhub_home: Path) -> None:
    """shape [2^30] packed bytes (2^33 entries) and no chunk file: a valid all-zero mask,
    imported with memory that follows the bytes present (no 1 GiB allocation touched)."""
    store = packed_store(tmp_path / "m.zarr")
    for c in (store / W / "c").iterdir():
        c.unlink()

    def big(d: dict) -> None:
        d["shape"] = [2 ** 30]
        d["chunk_grid"]["configuration"]["chunk_shape"] = [4 << 20]
        d["attributes"].update({"shape": [2 ** 33], "numel": 2 ** 33, "n_updated": 0})
    edit_array_json(store, big)
    code, err, rss = run_maskhub(["import", str(store), "--name", "big"], maskhub_home)
    assert code == 0, err
    honest = packed_store(tmp_path / "honest.zarr")
    code, err, baseline = run_maskhub(["import", str(honest), "--name", "honest"], maskhub_home)
    assert code == 0, err
    assert rss < baseline + RSS_SLACK_MB, (rss, baseline)  # the declared GiB is 1024 MB
    mask = Registry().get("big")
    assert (mask.n_params, mask.n_updated) == (2 ** 33, 0)
    assert not list((mask.path / W).rglob("c/*"))  # still no chunk stored


# -- fsck --------------------------------------------------------------------------------------


def test_fsck_reports_bad_counts(tmp_path: Path, maskhub_home: Path) -> None:
    Registry().add(packed_store(tmp_path / "m.zarr"), name="m")
    Registry().add(packed_store(tmp_path / "n.zarr"), name="n")
    m, n = Registry().get("m"), Registry().get("n")
    con = duckdb.connect(str(maskhub_home / "registry.duckdb"))
    con.execute("UPDATE tensors SET numel = -1 WHERE mask_id = ?", [m.id])
    con.execute("UPDATE masks SET n_updated = -5 WHERE id = ?", [n.id])
    con.close()
    from click.testing import CliRunner

    from maskhub.cli import main

    res = CliRunner().invoke(main, ["fsck"])
    assert res.exit_code == 1, res.output
    assert res.stdout.splitlines() == [
        f"bad-counts: mask m ({m.id[:12]}): tensor {W!r}: numel is -1, not a non-negative "
        f"integer (its bits cannot be trusted; remove it: `maskhub rm m`)",
        f"bad-counts: mask n ({n.id[:12]}): n_updated is -5, not a non-negative integer "
        "(its bits cannot be trusted; remove it: `maskhub rm n`)"]


def test_json_nesting_in_plain_python_is_the_vectorized_one() -> None:
    """Small JSON texts (every zarr.json of a push or a pull) have their nesting measured
    without numpy: the same figures as the vectorized walk, on texts built to trip it
    (escaped quotes and backslashes, brackets inside strings, unbalanced brackets)."""
    import random

    from maskhub.checkpoints import validate

    rng = random.Random(21)
    alphabet = b'[]{}"\\ a:,'
    texts = [bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
             for _ in range(5000)]
    texts += [b"[" * 1001 + b"]" * 1001, b'{"a": {"b": "}}}"}, "c": {}}', b"]]]", b""]
    for text in texts:
        plain = text.replace(b"\\\\", b"").replace(b'\\"', b"")
        assert validate._nesting_plain(plain) == validate._nesting_numpy(plain), text
    big = b"{" + b", ".join(b'"t%d": {"shape": [1, 2]}' % i for i in range(20_000)) + b"}"
    assert len(big) > validate.NESTING_PLAIN_BYTES  # the vectorized walk, as before
    assert validate.json_nesting(big) == validate._nesting_plain(big) == (3, 20_000)
