"""maskhub beside its fair peers and the machine's read floors, whole processes, one run.

    python bench/bench_peers.py [--sizes 3e6,1e9] [--rounds 3] [--cold | --cold-only] [--hub]
                                [--write]
    python bench/bench_peers.py --sizes '' [--write]   # the Hub rows only

Rows, for each generated bf16 pair (``--sizes`` bytes per side; generated, then removed):

* read floors: ``cat`` of both files, two ``cat`` in parallel (one per file), a Python
  process that maps both files and touches one byte per page (``mmap`` floor);
* peers: a 20-line numpy script (memmap both files, widen bf16 to fp32 exactly, ``|a-b| >
  tol``, ``np.packbits``, one ``.npz``), a torch ``safe_open`` script (one tensor at a time,
  ``(a.float() - b.float()).abs() > tol``), and the naive load-everything script
  (``bench/workers.py naive``) as one more row;
* ``maskhub diff`` (a fresh name in its own home each time); in cold rounds also ``maskhub
  diff, page cache``, the same command with ``MASKHUB_DIRECT_IO=0`` (reading through the page
  cache, as maskhub did before it read cold files around it).

Every row is a fresh process timed from outside (wall from spawn to exit, CPU of the child);
the rows are run in interleaved rounds and each figure is the median over rounds, each ratio
the median of the per-round ratios. ``--cold`` adds rounds with both files evicted from the
page cache (``posix_fadvise(DONTNEED)`` after ``fsync``) before each row; ``--cold-only``
runs only those (for a pair larger than RAM, which the naive row could not load). ``--hub``
pushes and pulls a registered mask through the local Hub server of the tests
(``tests/hubserver.py``) against ``huggingface_hub.upload_folder`` / ``snapshot_download``
of the same store.
The pull goes into a home whose (empty) registry exists already, as a user's does; creating
one costs ~0.3 s more, once. ``--sizes ''`` (no pair) runs the Hub rows only.
``--write`` replaces the "Peers" section of BENCHMARKS.md with the report; after a Hub-only
run, only its "Hub" subsection (the other subsections keep their figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import compile_maskhub  # noqa: E402

ROOT = HERE.parent
BIN = Path(sys.executable).parent
MB = 1 << 20

NUMPY_PEER = textwrap.dedent('''
    import json, struct, sys
    import numpy as np
    def tensors(path):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        mm = np.memmap(path, np.uint8, "r")
        for k, v in header.items():
            if k != "__metadata__":
                a, b = v["data_offsets"]
                yield k, mm[8 + n + a: 8 + n + b].view(np.uint16)
    def widen(x):  # bf16 -> fp32, exact
        return (x.astype(np.uint32) << 16).view(np.float32)
    base, target, out, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    other = dict(tensors(target))
    masks = {k: np.packbits(np.abs(widen(x) - widen(other[k])) > tol)
             for k, x in tensors(base)}
    np.savez(out, **masks)
''')

TORCH_PEER = textwrap.dedent('''
    import sys
    import torch
    from safetensors import safe_open
    base, target, out, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    masks = {}
    with safe_open(base, "pt") as fa, safe_open(target, "pt") as fb:
        for k in fa.keys():
            d = (fa.get_tensor(k).float() - fb.get_tensor(k).float()).abs() > tol
            masks[k] = d
    torch.save(masks, out)
''')

MMAP_FLOOR = textwrap.dedent('''
    import mmap, sys
    import numpy as np
    total = 0
    for p in sys.argv[1:]:
        with open(p, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            total += int(np.frombuffer(mm, np.uint8)[::mmap.PAGESIZE].sum())
    print(total)
''')


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A bf16 safetensors file from uint16 bit patterns."""
    write_streamed(path, {k: a.shape for k, a in tensors.items()}, lambda k: tensors[k])


def header_bytes(shapes: dict[str, tuple[int, ...]]) -> bytes:
    """The length prefix and JSON header of a bf16 safetensors file of ``shapes``."""
    header, offset = {}, 0
    for k, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        header[k] = {"dtype": "BF16", "shape": list(shape),
                     "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_streamed(path: Path, shapes: dict[str, tuple[int, ...]], make) -> None:
    """A bf16 safetensors file whose tensors ``make(name)`` builds one at a time (uint16 bit
    patterns), so that a pair larger than RAM can be generated."""
    with open(path, "wb") as f:
        f.write(header_bytes(shapes))
        for k in shapes:
            f.write(np.ascontiguousarray(make(k), dtype=np.uint16).tobytes())


def make_pair(root: Path, size: float, density: float, seed: int = 0) -> tuple[Path, Path]:
    """A Llama-shaped bf16 pair of about ``size`` bytes per side (hidden 256 below 64 MB, else
    2048), a ``density`` fraction of each matrix moved by 1-3 bf16 steps, norms unchanged.

    Values are tiled from one 8 Mi-entry N(0, 0.02) block (generation stays fast); tensors are
    generated one at a time (both sides of a tensor together), so memory does not grow with
    ``size``."""
    rng = np.random.default_rng(seed)
    h = 256 if size < 64 * MB else 2048
    mats = [("self_attn.q_proj.weight", (h, h)), ("self_attn.k_proj.weight", (h // 4, h)),
            ("self_attn.v_proj.weight", (h // 4, h)), ("self_attn.o_proj.weight", (h, h)),
            ("mlp.gate_proj.weight", (4 * h, h)), ("mlp.up_proj.weight", (4 * h, h)),
            ("mlp.down_proj.weight", (h, 4 * h))]
    per_layer = sum(a * b for _, (a, b) in mats) + 2 * h
    layers = max(1, round(size / 2 / per_layer))
    block = ((rng.standard_normal(8 << 20, dtype=np.float32) * 0.02)
             .view(np.uint32) >> 16).astype(np.uint16)
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            shapes[p + n] = (h,)
        for n, shape in mats:
            shapes[p + n] = shape
    pending: dict[str, np.ndarray] = {}  # the target side of the tensor just made
    pos = [0]

    def base_tensor(name: str) -> np.ndarray:
        shape = shapes[name]
        if len(shape) == 1:  # norms: 1.0, unchanged
            a = np.full(shape, 0x3F80, np.uint16)
            pending[name] = a
            return a
        numel = shape[0] * shape[1]
        idx = (np.arange(numel) + pos[0]) % block.size
        pos[0] += 7919
        a = block[idx].reshape(shape)
        b = a.copy()
        flat = b.reshape(-1)
        k = rng.binomial(numel, density)
        where = rng.choice(numel, size=k, replace=False) if k < numel // 8 else \
            np.flatnonzero(rng.random(numel) < density)
        flat[where] += rng.integers(1, 4, where.size).astype(np.uint16)
        pending[name] = b
        return a

    (root / "base").mkdir(parents=True, exist_ok=True)
    (root / "target").mkdir(parents=True, exist_ok=True)
    # both files written side by side, one tensor at a time
    with open(root / "target" / "model.safetensors.tmp", "wb") as tf:
        def base_then_target(name: str) -> np.ndarray:
            a = base_tensor(name)
            tf.write(np.ascontiguousarray(pending.pop(name)).tobytes())
            return a
        tf.write(header_bytes(shapes))
        write_streamed(root / "base" / "model.safetensors", shapes, base_then_target)
    os.replace(root / "target" / "model.safetensors.tmp", root / "target" / "model.safetensors")
    return root / "base", root / "target"


def evict(files: list[Path]) -> None:
    """Drop ``files`` from the page cache (no root needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[Path]) -> None:
    """Read ``files`` into the page cache."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(16 * MB):
                pass


def run(cmd: list[str] | str, env: dict[str, str] | None = None) -> dict[str, float]:
    """One whole process: wall seconds from spawn to exit and the child's CPU seconds."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=isinstance(cmd, str), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    err = proc.stderr.read().decode() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed:\n{err[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime}


def diff_rows(base: Path, target: Path, work: Path, tol: float) -> dict[str, list[str] | str]:
    """The commands of one pair, by row name."""
    a, b = base / "model.safetensors", target / "model.safetensors"
    py = sys.executable
    for name, code in (("numpy_peer.py", NUMPY_PEER), ("torch_peer.py", TORCH_PEER),
                       ("mmap_floor.py", MMAP_FLOOR)):
        (work / name).write_text(code)
    return {
        "cat (both files)": f"cat {a} {b} > /dev/null",
        "2x cat in parallel": f"cat {a} > /dev/null & cat {b} > /dev/null; wait",
        "mmap page-touch floor": [py, str(work / "mmap_floor.py"), str(a), str(b)],
        "numpy peer (20 lines)": [py, str(work / "numpy_peer.py"), str(a), str(b),
                                  str(work / "out.npz"), str(tol)],
        "torch safe_open peer": [py, str(work / "torch_peer.py"), str(a), str(b),
                                 str(work / "out.pt"), str(tol)],
        "naive load-everything": [py, str(HERE / "workers.py"), "naive", str(base), str(target),
                                  str(work / "naive.pt"), str(tol)],
        "maskhub diff": "MASKHUB_DIFF",
        # cold rounds only: the diff made to read through the page cache (the mapping and
        # read-ahead threads), as before files were read around it (checkpoints/direct.py)
        "maskhub diff, page cache": "MASKHUB_DIFF",
    }


def bench_pair(size: float, rounds: int, cold: bool, work: Path, tol: float,
               skip: set[str], warm_rounds: bool = True) -> dict:
    """Interleaved rounds of every row on one generated pair (warm, then cold)."""
    base, target = make_pair(work / "pair", size, density=0.05)
    files = [base / "model.safetensors", target / "model.safetensors"]
    nbytes = sum(f.stat().st_size for f in files)
    rows = {k: v for k, v in diff_rows(base, target, work, tol).items() if k not in skip}
    home = work / "home"
    env = dict(os.environ)
    out: dict = {"bytes": nbytes, "modes": {}}
    modes = (["warm"] if warm_rounds else []) + (["cold"] if cold else [])
    for mode in modes:
        if mode == "cold":  # the cold rows: floors, the numpy peer and maskhub
            names = [k for k in rows if k in ("cat (both files)", "2x cat in parallel",
                                              "numpy peer (20 lines)", "maskhub diff",
                                              "maskhub diff, page cache")]
        else:
            names = [k for k in rows if k != "maskhub diff, page cache"]
        runs: dict[str, list[dict]] = {k: [] for k in names}
        for r in range(rounds):
            for k in names:
                (evict if mode == "cold" else warm)(files)
                cmd = rows[k]
                if cmd == "MASKHUB_DIFF":
                    cmd = [str(BIN / "maskhub"), "diff", str(base), str(target), "--home",
                           str(home), "--name", f"r{r}-{mode}-{time.time_ns()}", "--tol",
                           str(tol), "--device", "cpu"]
                direct_io = {"MASKHUB_DIRECT_IO": "0"} if k.endswith("page cache") else {}
                runs[k].append(run(cmd, {**env, **direct_io}))
                print(f"{mode} {size:.0e} round {r} {k}: {runs[k][-1]['wall']:.2f} s",
                      file=sys.stderr)
            for junk in ("out.npz", "out.pt", "naive.pt"):
                (work / junk).unlink(missing_ok=True)
        out["modes"][mode] = runs
    shutil.rmtree(work / "pair")
    shutil.rmtree(home, ignore_errors=True)
    return out


def bench_hub(rounds: int, work: Path, size: float) -> dict:
    """push/pull of one registered mask against upload_folder/snapshot_download."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hubserver import HubServer

    base, target = make_pair(work / "hpair", size, density=0.05)
    home = work / "hub-home"
    run([str(BIN / "maskhub"), "diff", str(base), str(target), "--home", str(home),
         "--name", "m", "--device", "cpu"])
    shutil.rmtree(work / "hpair")
    store = next((home / "masks").glob("*.zarr"))
    runs: dict[str, list[dict]] = {k: [] for k in ("maskhub push", "upload_folder",
                                                  "maskhub pull", "snapshot_download")}
    with HubServer(lfs_threshold=10 * 1024) as hub:
        hf_home = work / "hf"
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(hf_home),
                   HF_HUB_CACHE=str(hf_home / "hub"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="0",
                   HF_TOKEN_PATH=str(hf_home / "token"))
        env.pop("HF_TOKEN", None)
        py = sys.executable
        for r in range(rounds):
            runs["maskhub push"].append(run([str(BIN / "maskhub"), "push", "m", f"u/mh{r}",
                                             "--home", str(home)], env))
            runs["upload_folder"].append(run([py, "-c", (
                "import sys; from huggingface_hub import HfApi; a = HfApi(); "
                "a.create_repo(sys.argv[2], exist_ok=True); "
                "a.upload_folder(folder_path=sys.argv[1], path_in_repo='mask.zarr', "
                "repo_id=sys.argv[2])"), str(store), f"u/hf{r}"], env))
            shutil.rmtree(hf_home / "hub", ignore_errors=True)
            run([py, "-c", "import sys; from maskhub import Registry; "  # untimed: the registry
                 "Registry(sys.argv[1]).index.migrate()", str(work / f"pull-home{r}")], env)
            runs["maskhub pull"].append(run([str(BIN / "maskhub"), "pull", f"u/mh{r}",
                                             "--home", str(work / f"pull-home{r}")], env))
            shutil.rmtree(hf_home / "hub", ignore_errors=True)
            runs["snapshot_download"].append(run([py, "-c", (
                "import sys; from huggingface_hub import snapshot_download; "
                "snapshot_download(sys.argv[1])"), f"u/mh{r}"], env))
            shutil.rmtree(hf_home / "hub", ignore_errors=True)
            shutil.rmtree(work / f"pull-home{r}", ignore_errors=True)
            print(f"hub round {r}: " + ", ".join(f"{k} {v[-1]['wall']:.2f} s"
                                                 for k, v in runs.items()), file=sys.stderr)
    files = [p for p in store.rglob("*") if p.is_file()]
    out = {"files": len(files), "bytes": sum(p.stat().st_size for p in files), "runs": runs}
    shutil.rmtree(home)
    return out


def med(xs: list[float]) -> float:
    """Median."""
    return statistics.median(xs)


def report(pairs: list[dict], hub: dict | None, load: tuple[float, float, float],
           rounds: int) -> str:
    """The BENCHMARKS.md section."""
    lines = ["## Peers: maskhub beside fair peers and the read floors (`bench/bench_peers.py`)",
             "",
             f"Whole processes, medians of {rounds} interleaved rounds; ratios are medians of "
             "per-round ratios. Load average at the start "
             f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores: the "
             "machine was shared with other sessions while this ran, so wall times are noisy "
             "(CPU seconds of the process itself are steadier).", ""]
    for p in pairs:
        for mode, runs in p["modes"].items():
            mh = runs["maskhub diff"]
            lines += [f"### {p['bytes'] / 2 / 1e6:,.0f} MB per side, {mode} page cache", "",
                      "| row | wall s | CPU s | GB/s (both sides) | maskhub / row (wall) |",
                      "|---|---:|---:|---:|---:|"]
            for k, rs in runs.items():
                wall = med([r["wall"] for r in rs])
                ratio = med([m["wall"] / r["wall"] for m, r in zip(mh, rs, strict=True)])
                lines.append(f"| {k} | {wall:.2f} | {med([r['cpu'] for r in rs]):.2f} | "
                             f"{p['bytes'] / wall / 1e9:.2f} | {ratio:.2f}x |")
            lines.append("")
    if hub:
        lines += hub_report(hub, load, rounds, alone=not pairs)
    return "\n".join(lines)


def hub_report(hub: dict, load: tuple[float, float, float], rounds: int,
               alone: bool) -> list[str]:
    """The lines of the Hub subsection (``alone``: a Hub-only run, which says its own rounds
    and load, since the section's header belongs to another run)."""
    r = hub["runs"]
    lines = [f"### Hub: one mask store ({hub['files']} files, "
             f"{hub['bytes'] / 1e6:.1f} MB), local Hub server", ""]
    if alone:
        lines += [f"Rerun alone (`--sizes ''`): medians of {rounds} interleaved rounds, load "
                  f"average at the start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.", ""]
    lines += ["| row | wall s | CPU s | ratio |", "|---|---:|---:|---:|"]
    for a, b in (("maskhub push", "upload_folder"), ("maskhub pull", "snapshot_download")):
        ratio = med([x["wall"] / y["wall"] for x, y in zip(r[a], r[b], strict=True)])
        for k in (a, b):
            lines.append(f"| {k} | {med([x['wall'] for x in r[k]]):.2f} | "
                         f"{med([x['cpu'] for x in r[k]]):.2f} | "
                         f"{f'{ratio:.2f}x' if k == a else ''} |")
    lines.append("")
    return lines


def write_section(text: str, hub_only: bool = False) -> None:
    """Replace (or append) the Peers section of BENCHMARKS.md; with ``hub_only`` (``text``:
    the Hub subsection alone), only that subsection of the Peers section."""
    path = ROOT / "BENCHMARKS.md"
    path.write_text(replace_section(path.read_text(), text, hub_only))


def replace_section(doc: str, text: str, hub_only: bool = False) -> str:
    """``doc`` with its Peers section (or, ``hub_only``, the "### Hub:" subsection inside
    it) replaced by ``text``, or ``text`` added where it is missing."""
    start = doc.find("## Peers:")
    if start < 0:
        if hub_only:
            text = "## Peers: maskhub beside fair peers and the read floors " \
                   "(`bench/bench_peers.py`)\n\n" + text
        return doc.rstrip() + "\n\n" + text.rstrip() + "\n"
    end = doc.find("\n## ", start + 1)
    end = len(doc) if end < 0 else end + 1
    if not hub_only:
        return doc[:start] + text.rstrip() + "\n\n" + doc[end:]
    section = doc[start:end]
    sub = section.find("### Hub:")
    if sub < 0:
        section = section.rstrip() + "\n\n" + text.rstrip() + "\n\n"
    else:
        stop = section.find("\n### ", sub + 1)
        stop = len(section) if stop < 0 else stop + 1
        section = section[:sub] + text.rstrip() + "\n\n" + section[stop:].lstrip("\n")
        section = section.rstrip() + "\n\n"
    return doc[:start] + section + doc[end:]


def main() -> None:
    """Run the benchmark and print (or write) the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="3e6,1e9", help="bytes per side, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also cold-cache rounds")
    ap.add_argument("--cold-only", action="store_true",
                    help="only cold-cache rounds (a pair larger than RAM: no naive row)")
    ap.add_argument("--hub", action="store_true", help="also push/pull on the local Hub server")
    ap.add_argument("--hub-size", type=float, default=3e8, help="pair size for the Hub mask")
    ap.add_argument("--skip", default="", help="row names to leave out, comma-separated")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--write", action="store_true", help="write the section to BENCHMARKS.md")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    compile_maskhub()  # as installed: no process pays for compiling maskhub's sources
    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="maskhub-peers-", dir=args.work))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    try:
        pairs = [bench_pair(size, args.rounds, args.cold or args.cold_only, work, args.tol,
                            skip, warm_rounds=not args.cold_only)
                 for size in sizes]
        hub = bench_hub(args.rounds, work, args.hub_size) if args.hub or not sizes else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if pairs:
        text = report(pairs, hub, load, args.rounds)
    else:
        text = "\n".join(hub_report(hub, load, args.rounds, alone=True)) if hub else ""
    print(text)
    if args.write:
        write_section(text, hub_only=not pairs)


if __name__ == "__main__":
    main()
