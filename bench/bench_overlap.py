"""Benchmark: overlap of two masks of a Llama-3.1-8B-shaped model (8.03e9 parameters each).

The masks are synthetic: packed bits drawn at random tensor by tensor (norms never updated)
and written through ``MaskWriter`` one tensor at a time, so the 8e9-entry masks never exist
unpacked. Mask A = x & y and mask B = x & z for uniform random bit streams x, y, z: each has
density 0.25 and they share half of their updates (o1 = o2 = 0.5, about twice the random
baseline). The timed call is ``Registry.overlap(a, b, refresh=True)``: every chunk read from
disk and zstd-decoded, popcounts on packed bits, results stored in SQL.

Usage::

    .venv/bin/python bench/bench_overlap.py                 # 32 layers: 8.03e9 parameters
    .venv/bin/python bench/bench_overlap.py --layers 4      # quicker: 1.9e9 parameters
    .venv/bin/python bench/bench_overlap.py --all 3 --combine --cold

The naive baseline, timed in the same run, is what one writes with stock zarr and numpy:
per tensor, read both packed arrays, ``np.unpackbits`` them into one byte per parameter and
count ``(a & b).sum()`` (streaming too, so that it fits in memory). ``--write`` puts the
figures into BENCHMARKS.md (section ``bench_overlap``). The generated masks are deleted at
the end unless ``--home`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import zarr

from maskhub import Mask, Registry
from maskhub.schemas.metadata import MaskMetadata, TensorStats
from maskhub.schemas.names import parse_tensor_name
from maskhub.storage.store import MaskWriter

GEN_STEP = 64 << 20  # bytes of random bits drawn at a time


def llama8b_shapes(layers: int = 32) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of Llama-3.1-8B (vocab 128256, hidden 4096, MLP 14336, GQA 8 heads)."""
    vocab, hidden, inter, kv = 128256, 4096, 14336, 1024
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _bits(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.frombuffer(rng.bytes(n), np.uint8).copy()


def make_masks(reg: Registry, shapes: dict[str, tuple[int, ...]], count: int,
               seed: int = 0) -> list[Mask]:
    """Register ``count`` masks ``x & y_k`` over ``shapes`` (x shared), tensor by tensor."""
    ids = [uuid.uuid4().hex for _ in range(count)]
    tmps = [reg.staging_path(i) for i in ids]
    tmps[0].parent.mkdir(parents=True, exist_ok=True)
    writers = [MaskWriter(t) for t in tmps]
    stats: list[list[TensorStats]] = [[] for _ in range(count)]
    rngs = [np.random.default_rng([seed, k]) for k in range(count + 1)]
    for name, shape in shapes.items():
        numel = int(np.prod(shape))
        nbytes = (numel + 7) // 8
        layer, module = parse_tensor_name(name)
        outs = [np.zeros(nbytes, np.uint8) for _ in range(count)]
        if "norm" not in name:
            for start in range(0, nbytes, GEN_STEP):
                stop = min(nbytes, start + GEN_STEP)
                x = _bits(rngs[0], stop - start)
                for k in range(count):
                    np.bitwise_and(x, _bits(rngs[k + 1], stop - start), out=outs[k][start:stop])
        for k in range(count):
            n = int(np.bitwise_count(outs[k]).sum(dtype=np.int64))
            st = TensorStats(name, shape, numel, n, layer, module, "bfloat16", "bfloat16")
            writers[k].add(st, outs[k])
            stats[k].append(st)
    masks = []
    for k in range(count):
        md = MaskMetadata(
            id=ids[k], name=f"bench-{k}", base_model="bench/llama-3.1-8b-shaped",
            target_model=f"bench/run-{k}", n_params=sum(s.numel for s in stats[k]),
            n_updated=sum(s.n_updated for s in stats[k]), seed=k,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()))
        writers[k].finish(md)
        masks.append(reg.register_store(tmps[k], md, stats[k]))
    return masks


def evict(path: Path) -> None:
    """Drop a store's files (only those) from the page cache, for a cold-read figure."""
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def naive_overlap(path_a: Path, path_b: Path, names: list[str]) -> tuple[int, int, int]:
    """The baseline: unpack both masks tensor by tensor with stock zarr + numpy and count
    ``|A|``, ``|B|`` and ``|A & B|`` on one byte per parameter."""
    ga, gb = zarr.open_group(str(path_a), mode="r"), zarr.open_group(str(path_b), mode="r")
    n_a = n_b = n_both = 0
    for name in names:
        a = np.unpackbits(ga[name][:], bitorder="little").astype(bool)
        b = np.unpackbits(gb[name][:], bitorder="little").astype(bool)
        n_a += int(a.sum())
        n_b += int(b.sum())
        n_both += int((a & b).sum())
        del a, b
    return n_a, n_b, n_both


def du(path: Path) -> int:
    """Bytes on disk under ``path``."""
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    """Build the masks, time the overlap (and optionally --all and combine), print figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32: 8.03e9 params)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of the pair overlap")
    ap.add_argument("--all", dest="all_masks", type=int, default=0,
                    help="also time overlap --all over this many masks")
    ap.add_argument("--combine", action="store_true", help="also time a consensus combine")
    ap.add_argument("--cold", action="store_true",
                    help="also time one run with the stores evicted from the page cache")
    ap.add_argument("--home", help="registry home (default: a fresh temporary directory, "
                    "deleted at the end)")
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = ap.parse_args()

    home = Path(args.home or tempfile.mkdtemp(prefix="maskhub-bench-"))
    try:
        fig = run(args, home)
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(fig, indent=2))
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from report import write_section

        write_section(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", "bench_overlap",
                      report(args, fig))


def run(args: argparse.Namespace, home: Path) -> dict[str, object]:
    """Build the masks in ``home`` and measure; returns the figures."""
    load = os.getloadavg()
    reg = Registry(home)
    shapes = llama8b_shapes(args.layers)
    count = max(2, args.all_masks)
    t0 = time.perf_counter()
    masks = make_masks(reg, shapes, count)
    build_s = time.perf_counter() - t0
    a, b = masks[0], masks[1]
    n = a.n_params
    fig: dict[str, object] = {
        "params_per_mask": n, "tensors": len(shapes), "density_a": a.density,
        "packed_gb_per_mask": n / 8 / 1e9, "disk_gb_per_mask": du(a.path) / 1e9,
        "build_s": round(build_s, 1), "cpu_count": os.cpu_count(),
        "load_avg": [round(x, 2) for x in load],
    }
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        r = reg.overlap(a.name, b.name, refresh=True)
        times.append(time.perf_counter() - t)
    fig.update({"overlap_s_min": round(min(times), 3),
                "overlap_s_median": round(statistics.median(times), 3),
                "gparams_per_s": round(2 * n / min(times) / 1e9, 2),
                "n_both": r.n_both, "o1": r.o1, "o1_random": r.o1_random, "z": r.z_score})
    t = time.perf_counter()
    reg.overlap(a.name, b.name)
    fig["cached_overlap_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    naive = naive_overlap(a.path, b.path, a.tensor_names())
    fig["naive_s"] = round(time.perf_counter() - t, 3)
    assert naive == (a.n_updated, b.n_updated, r.n_both), "baseline and maskhub disagree"
    if args.cold:
        evict(a.path)
        evict(b.path)
        t = time.perf_counter()
        reg.overlap(a.name, b.name, refresh=True)
        fig["overlap_cold_s"] = round(time.perf_counter() - t, 3)
    if args.all_masks >= 2:
        t = time.perf_counter()
        m = reg.overlap_all([x.name for x in masks], refresh=True)
        fig[f"overlap_all_{count}_masks_s"] = round(time.perf_counter() - t, 3)
        fig["overlap_all_pairs"] = len(m.results)
    if args.combine:
        t = time.perf_counter()
        c = reg.combine("consensus", [x.name for x in masks], min_count=2, name="bench-cons")
        fig[f"combine_consensus_{count}_masks_s"] = round(time.perf_counter() - t, 3)
        fig["consensus_density"] = c.density
    return fig


def report(args: argparse.Namespace, fig: dict) -> str:
    """The BENCHMARKS.md section."""
    n = fig["params_per_mask"]
    best = fig["overlap_s_min"]
    lines = [
        "## Overlap: `bench/bench_overlap.py` (issue 4)", "",
        f"Produced by one run of `.venv/bin/python bench/bench_overlap.py --layers {args.layers}"
        f"{f' --all {args.all_masks}' if args.all_masks else ''}"
        f"{' --combine' if args.combine else ''}{' --cold' if args.cold else ''} --write` on "
        f"{platform.processor() or platform.machine()}, {fig['cpu_count']} cores (load "
        f"average at start {fig['load_avg'][0]:.2f}; other jobs shared the cores). Two masks "
        f"of a Llama-3.1-8B-shaped model: {n:,} parameters each, density "
        f"{fig['density_a']:.3f}, {fig['disk_gb_per_mask']:.2f} GB on disk each "
        f"({fig['packed_gb_per_mask']:.2f} GB packed). Counts agree exactly between the two "
        "methods (checked in the run).", "",
        "| figure | naive (stock zarr + unpackbits) | maskhub `overlap` | naive / maskhub |",
        "|---|---:|---:|---:|",
        f"| pair overlap, decode included, warm (s) | {fig['naive_s']:.2f} | {best:.2f} "
        f"(median {fig['overlap_s_median']:.2f}) | {fig['naive_s'] / best:.1f}x |",
        f"| parameters per second (both masks) | {2 * n / fig['naive_s'] / 1e9:.2f} G | "
        f"{fig['gparams_per_s']:.2f} G | |",
        f"| asking again (cached in SQL) (s) | | {fig['cached_overlap_s']:.3f} | |",
    ]
    if "overlap_cold_s" in fig:
        lines.append(f"| pair overlap, stores evicted from page cache (s) | | "
                     f"{fig['overlap_cold_s']:.2f} | |")
    for k, v in fig.items():
        if k.startswith("overlap_all_") and k.endswith("_s"):
            lines.append(f"| `overlap --all`, {fig['overlap_all_pairs']} pairs, each mask "
                         f"read once (s) | | {v:.2f} | |")
        if k.startswith("combine_consensus_"):
            lines.append(f"| `combine consensus --min-count 2` (s) | | {v:.2f} | |")
    lines += ["", f"Target (issue 4): pair overlap of two 8e9-parameter masks in under 10 s: "
              f"{'met' if best < 10 and n >= 8e9 else 'not met'} ({best:.2f} s)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
