"""Sparse patches side by side (issue 22): bytes against the dense target, zstd -3 and zipnn;
rebuilding against ``cp``; a chain of 50 patches against the dense trajectory.

    .venv/bin/python bench/bench_patch.py [--params 64e6] [--chain-params 8e6] [--steps 50]

One synthetic bf16 model (N(0, 0.02) weights, ``--params`` entries in 16 tensors). For each
density d in 0.2, 0.05, 0.01, 0.002 the target changes a random d of the entries (bits
that differ); ``maskhub diff --patch BASE TARGET`` makes the patch (lossless) and the
trainer's own patch of the same step (TRL #5417 layout: int32 flat indices + bf16 values) is
imported with ``maskhub import PATCH --base BASE`` (the same bits and values). The patch is
measured against: the full bf16 target, the target through zstd -3 (numcodecs), the
target through zipnn (PyPI) when it installs, and the bound 16·d + 1.1·H(d) bits per
parameter. ``maskhub apply`` is timed against ``cp`` of the target on a warm cache. The
chain: ``--steps`` patches of 1% each on a ``--chain-params`` model, ``maskhub trajectory
--patches`` against ``maskhub trajectory`` of the dense checkpoints (same rows
checked). Not a test: it writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from report import write_section  # noqa: E402

DENSITIES = (0.2, 0.05, 0.01, 0.002)
N_TENSORS = 16


def _bf16_bits(n: int, rng: np.random.Generator) -> np.ndarray:
    """N(0, 0.02) values as bf16 bit patterns (round to nearest even)."""
    f = (rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)).view(np.uint32)
    return ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).astype(np.uint16)


def _save(tensors: dict[str, np.ndarray], path: Path, dtypes: dict[str, str],
          metadata: dict[str, str] | None = None) -> None:
    """A safetensors file from raw numpy arrays (bf16 given as uint16 bits)."""
    header: dict = {}
    offset = 0
    for name, a in tensors.items():
        header[name] = {"dtype": dtypes[name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


def _model(n_params: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    per = n_params // N_TENSORS
    cols = 1024
    rows = max(1, per // cols)
    return {f"model.layers.{i}.mlp.w.weight": _bf16_bits(rows * cols, rng).reshape(rows, cols)
            for i in range(N_TENSORS)}


def _mutate(state: dict[str, np.ndarray], density: float, rng: np.random.Generator
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A copy of ``state`` with a random ``density`` of entries moved by 1-8 bf16 steps
    (bits always differ); returns it and the flat indices moved per tensor."""
    out, moved = {}, {}
    for name, a in state.items():
        flat = a.reshape(-1).copy()
        k = int(round(density * flat.size))
        idx = np.sort(rng.choice(flat.size, size=k, replace=False))
        step = rng.integers(1, 9, size=k).astype(np.int16) * rng.choice(
            np.array([-1, 1], dtype=np.int16), size=k)
        flat[idx] = (flat[idx].view(np.int16) + step).view(np.uint16)
        out[name] = flat.reshape(a.shape)
        moved[name] = idx
    return out, moved


def _write_model(state: dict[str, np.ndarray], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _save(state, directory / "model.safetensors", dict.fromkeys(state, "BF16"))
    return directory


def _write_patch(state: dict[str, np.ndarray], moved: dict[str, np.ndarray], path: Path,
                 step: int) -> Path:
    """TRL #5417's layout: NAME.indices (int32) + NAME.values (bf16)."""
    tensors, dtypes = {}, {}
    for name, idx in moved.items():
        tensors[f"{name}.indices"] = idx.astype(np.int32)
        tensors[f"{name}.values"] = state[name].reshape(-1)[idx]
        dtypes[f"{name}.indices"], dtypes[f"{name}.values"] = "I32", "BF16"
    _save(tensors, path, dtypes, {"format": "sparse_weight_patch", "version": "1",
                                  "model_version": str(step),
                                  "prev_model_version": str(step - 1)})
    return path


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _entropy(d: float) -> float:
    return -(d * math.log2(d) + (1 - d) * math.log2(1 - d))


def _zipnn(data: bytes) -> tuple[int | None, str]:
    try:
        from zipnn import ZipNN
    except Exception as exc:  # not installed / does not build
        return None, f"zipnn not importable: {type(exc).__name__}: {exc}"
    try:
        z = ZipNN(bytearray_dtype="bfloat16", input_format="byte")
        from importlib.metadata import version

        return len(z.compress(data)), f"zipnn {version('zipnn')} (PyPI, built from its sdist " \
            "here), `ZipNN(bytearray_dtype='bfloat16', input_format='byte')` on the target " \
            "file's bytes"
    except Exception as exc:
        return None, f"zipnn failed: {type(exc).__name__}: {exc}"


def _timed(fn, repeat: int = 3) -> float:
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_sizes(work: Path, n_params: int) -> tuple[list[dict], dict]:
    """Bytes per density, and `maskhub apply` against cp at d = 0.01."""
    from numcodecs import Zstd

    from maskhub import Registry

    base = _model(n_params, seed=0)
    base_dir = _write_model(base, work / "base")
    rows, rebuild = [], {}
    rng = np.random.default_rng(1)
    zipnn_note = ""
    for d in DENSITIES:
        target, moved = _mutate(base, d, rng)
        tdir = _write_model(target, work / f"target-{d}")
        tfile = tdir / "model.safetensors"
        patch = _write_patch(target, moved, work / f"patch-{d}.safetensors", 1)
        reg = Registry(work / f"home-{d}")
        t = time.perf_counter()
        imported = reg.add(patch, base=base_dir, name=f"p{d}")
        t_import = time.perf_counter() - t
        t = time.perf_counter()
        mask = reg.diff(base_dir, tdir, name=f"d{d}", patch=True, device="cpu")
        t_diff = time.perf_counter() - t
        n = mask.n_params
        assert mask.n_updated == imported.n_updated == sum(i.size for i in moved.values())
        store_bytes = _dir_bytes(Path(mask.store.path))
        values_bytes = _dir_bytes(Path(mask.store.path) / "values")
        import_bytes = _dir_bytes(Path(imported.store.path))
        data = tfile.read_bytes()
        t = time.perf_counter()
        zstd_bytes = len(Zstd(level=3).encode(data))
        t_zstd = time.perf_counter() - t
        t = time.perf_counter()
        zipnn_bytes, zipnn_note = _zipnn(data)
        t_zipnn = time.perf_counter() - t
        bound = (16 * d + 1.1 * _entropy(d)) * n / 8
        rows.append({"d": d, "n": n, "target": len(data), "trl": patch.stat().st_size,
                     "store": store_bytes, "values": values_bytes, "zstd": zstd_bytes,
                     "zipnn": zipnn_bytes, "import": import_bytes, "t_diff": t_diff,
                     "bound": bound, "t_import": t_import, "t_zstd": t_zstd,
                     "t_zipnn": t_zipnn})
        if d == 0.01:
            outs = iter(work / f"applied-{i}" for i in range(10))

            def apply_once(r=reg, m=mask, o=outs) -> None:
                r.apply(m, base_dir, next(o))

            t_apply = _timed(apply_once)
            rebuilt = work / "applied-0" / "model.safetensors"
            tensors_equal = all(
                np.array_equal(target[name].reshape(-1), _read_tensor(rebuilt, name))
                for name in target)
            cp_out = work / "copied.safetensors"
            t_cp = _timed(lambda f=tfile, o=cp_out: subprocess.run(["cp", str(f), str(o)],
                                                                  check=True))
            rebuild = {"d": d, "bytes": len(data), "t_rebuild": t_apply, "t_cp": t_cp,
                       "equal": tensors_equal}
            for i in range(3):
                shutil.rmtree(work / f"applied-{i}", ignore_errors=True)
        shutil.rmtree(tdir)
    return rows, {**rebuild, "zipnn_note": zipnn_note}


def _read_tensor(path: Path, name: str) -> np.ndarray:
    from maskhub.checkpoints.header import read_header

    info = next(i for i in read_header(path) if i.name == name)
    return np.fromfile(path, dtype=np.uint8, count=info.nbytes, offset=info.offset) \
        .view(np.uint16)


def bench_chain(work: Path, n_params: int, steps: int) -> dict:
    """A chain of ``steps`` 1% patches: patch trajectory vs dense trajectory."""
    from maskhub import Registry

    rng = np.random.default_rng(7)
    state = _model(n_params, seed=3)
    dirs = [_write_model(state, work / "chain" / "ckpt-0")]
    patches = []
    for k in range(1, steps + 1):
        state, moved = _mutate(state, 0.01, rng)
        if k % 10 == 0:  # some entries go back to the base: cancelled updates
            first = _model(n_params, seed=3)
            for name, idx in moved.items():
                back = idx[: idx.size // 4]
                state[name].reshape(-1)[back] = first[name].reshape(-1)[back]
        dirs.append(_write_model(state, work / "chain" / f"ckpt-{k}"))
        patches.append(_write_patch(state, moved, work / "chain" / f"step-{k}.safetensors", k))
    t_patch = t_dense = math.inf
    for rep in range(2):  # best of two, interleaved (the machine is shared)
        reg_p, reg_d = Registry(work / f"home-chain-p{rep}"), Registry(work / f"home-chain-d{rep}")
        reg_p.ls(), reg_d.ls()  # both homes created and migrated before the clock starts
        t = time.perf_counter()
        rp = reg_p.trajectory([str(dirs[0]), *map(str, patches)], name="chain", patches=True)
        t_patch = min(t_patch, time.perf_counter() - t)
        t = time.perf_counter()
        rd = reg_d.trajectory(list(map(str, dirs)), name="dense", device="cpu")
        t_dense = min(t_dense, time.perf_counter() - t)
    cols = ("step", "n_updated_vs_first", "n_updated_vs_prev", "n_ever", "n_not_in_final")
    same = [[getattr(p, c) for c in cols] for p in rp.points] == \
        [[getattr(p, c) for c in cols] for p in rd.points] and \
        (rp.n_never, rp.n_cancelled, rp.n_subnetwork) == (rd.n_never, rd.n_cancelled,
                                                          rd.n_subnetwork)
    return {"steps": steps, "n": rp.n_params, "t_patch": t_patch, "t_dense": t_dense,
            "same": same, "patch_bytes": sum(p.stat().st_size for p in patches),
            "dense_bytes": sum(_dir_bytes(d) for d in dirs), "final": rp.n_subnetwork,
            "cancelled": rp.n_cancelled}


def build_report(rows: list[dict], rebuild: dict, chain: dict,
                 load: tuple[float, float, float]) -> str:
    """The BENCHMARKS.md section."""
    mb = 1e6
    n = rows[0]["n"]
    lines = [
        "## Sparse patches: `bench/bench_patch.py` (issue 22)", "",
        f"One run of `.venv/bin/python bench/bench_patch.py`: a synthetic bf16 model of "
        f"{n / 1e6:.1f} M parameters ({rows[0]['target'] / mb:.0f} MB), N(0, 0.02) weights; "
        "each density changes a random d of the entries by 1-8 bf16 steps. *patch* is the "
        "store `maskhub diff --patch BASE TARGET` writes (packed bits + the target's values, "
        "blosc zstd-1 with byte shuffle; lossless); *TRL file* the trainer's own patch of "
        "the same step (TRL #5417 layout: int32 indices + bf16 values, uncompressed); "
        "*import* the store `maskhub import TRL-FILE --base BASE` registers from it (the "
        "same bits and values as *patch*). *bound* = (16·d + 1.1·H(d)) bits per parameter. "
        "Load average at start "
        f"{load[0]:.2f} (2 cores shared with other work: times are noisy, sizes are not).", "",
        "| density | target MB | TRL file MB | **patch MB** | patch bits/param | bound "
        "bits/param | within bound | mask bits / H(d) | bits per value | zstd -3 MB | "
        "zipnn MB | zipnn / patch | import MB | diff --patch s | import s |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        bpp, bound_bpp = 8 * r["store"] / r["n"], 8 * r["bound"] / r["n"]
        z = "n/a" if r["zipnn"] is None else f"{r['zipnn'] / mb:.1f}"
        zr = "n/a" if r["zipnn"] is None else f"{r['zipnn'] / r['store']:.1f}x"
        lines.append(f"| {r['d']:g} | {r['target'] / mb:.1f} | {r['trl'] / mb:.2f} | "
                     f"**{r['store'] / mb:.2f}** | {bpp:.3f} | {bound_bpp:.3f} | "
                     f"{'yes' if r['store'] <= r['bound'] else 'no'} | "
                     f"{8 * (r['store'] - r['values']) / r['n'] / _entropy(r['d']):.2f} | "
                     f"{8 * r['values'] / (r['d'] * r['n']):.2f} | "
                     f"{r['zstd'] / mb:.1f} | {z} | {zr} | {r['import'] / mb:.2f} | "
                     f"{r['t_diff']:.2f} | {r['t_import']:.2f} |")
    lines += ["", f"zipnn: {rebuild['zipnn_note']}. Targets of issue 22: patch ≤ bound at "
              "every density; ≥ 2.5x smaller than zipnn at d = 0.2 and ≥ 10x at d ≤ 0.02. "
              "*mask bits / H(d)*: the packed bitmask arrays (and every zarr.json) against "
              "the mask's entropy bound; *bits per value*: the values arrays per stored value "
              "(16 raw). Where the patch misses the bound, the mask part is the reason: "
              "packed bits + zstd-1 (the mask store's codec since issue 1) sit well above "
              "H(d) at low density, as DESIGN.md measured (1.61x at 2%); a byte-gap code "
              "of the positions (1.01x there) would fit the bound.", ""]
    if rebuild:
        gbps = rebuild["bytes"] / 1e9
        lines += [
            f"`maskhub apply` of the d = {rebuild['d']:g} patch onto the base (a new "
            "directory of safetensors; in process, best of 3, warm cache): "
            f"{rebuild['t_rebuild']:.3f} s ({gbps / rebuild['t_rebuild']:.2f} GB/s of "
            f"target) against `cp` of the target {rebuild['t_cp']:.3f} s "
            f"({gbps / rebuild['t_cp']:.2f} GB/s): "
            f"{rebuild['t_cp'] / rebuild['t_rebuild']:.2f}x the throughput of cp (target "
            f"≥ 0.7x); rebuilt == target bit for bit: {rebuild['equal']}.", ""]
    lines += [
        f"Chain: {chain['steps']} patches of 1% each (every 10th step sends a quarter of "
        f"its entries back to the base) on a {chain['n'] / 1e6:.1f} M-parameter bf16 model: "
        f"`maskhub trajectory --patches BASE P1..P{chain['steps']}` "
        f"{chain['t_patch']:.2f} s ({chain['patch_bytes'] / mb:.1f} MB of patches) against "
        f"`maskhub trajectory` of the {chain['steps'] + 1} dense checkpoints "
        f"{chain['t_dense']:.2f} s ({chain['dense_bytes'] / mb:.0f} MB): "
        f"**{chain['t_dense'] / chain['t_patch']:.1f}x**; same rows: {chain['same']} (final "
        f"subnetwork {chain['final']:,}, cancelled {chain['cancelled']:,}). Both in one "
        "process, CPU, warm cache, best of two interleaved runs, each into a home created "
        "beforehand."]
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and write its BENCHMARKS.md section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=64e6)
    ap.add_argument("--chain-params", type=float, default=8e6)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-patch-") as tmp:
        work = Path(tmp)
        rows, rebuild = bench_sizes(work, int(args.params))
        chain = bench_chain(work, int(args.chain_params), args.steps)
    body = build_report(rows, rebuild, chain, load)
    print(body)
    write_section(args.out, "bench_patch", body)


if __name__ == "__main__":
    main()
