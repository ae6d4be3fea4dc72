"""Benchmark: what recording a run's masks live (``maskhub.torch.Recorder``) costs a training run.

A TinyLlama (GPT-2-small scale by default: 1.34e8 parameters) trains with AdamW in bf16 on one
batch per step. In the same process, measured side by side:

* the median time of a training step (forward, backward, optimizer step): the baseline;
* the median time of one ``record(step)`` (diff every parameter against θ0 on its device,
  pack, register ``RUN-step-N`` in a fresh registry) with ``keep="cpu"`` and ``keep="disk"``;
* the share of training time that recording every 1, 10 and 100 steps adds:
  ``record / (interval * step)``;
* the host memory each keep option adds: anonymous resident memory (``RssAnon``, the page
  cache of the θ0 file excluded: it is reclaimable) after the recorder is built, and the peak
  during a record (sampled every 5 ms), against the packed bits it must hold.

Runs on a GPU with ``--device cuda`` (the parameters and the diff on the GPU, θ0 in pinned
host memory or on disk).

Usage::

    .venv/bin/python bench/bench_record.py                      # 1.34e8 params, CPU
    .venv/bin/python bench/bench_record.py --device cuda --layers 24 --hidden 2048 --inter 5504
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from maskhub import Registry
from maskhub.demo.tinymodel import TinyLlama, synthetic_batches

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_size import add_model_args, model_config  # noqa: E402
from report import write_section  # noqa: E402


def rss_anon() -> int:
    """Anonymous resident bytes of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Samples RssAnon every few milliseconds while active; keeps the peak."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.005)

    def __enter__(self) -> PeakSampler:
        self.peak = rss_anon()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def main() -> None:
    """Train, record with each keep option, write the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, batch=4, seq=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps")
    ap.add_argument("--records", type=int, default=2, help="timed records per keep option")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent
                    / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = model_config(args, max_len=args.seq)
    torch.manual_seed(0)
    model = TinyLlama(cfg).to(dev, torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = [b.to(dev) for b in synthetic_batches(cfg, 4, batch=args.batch, seq=args.seq)]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def train_step(i: int) -> float:
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.loss(data[i % len(data)]).backward()
        opt.step()
        sync()
        return time.perf_counter() - t0

    train_step(0)  # warm-up: optimizer state allocated
    steps = [train_step(i) for i in range(args.steps)]
    step_s = statistics.median(steps)
    results: dict[str, dict] = {}
    step_no = 0
    for keep in ("cpu", "disk"):
        with tempfile.TemporaryDirectory() as home:
            reg = Registry(home)
            before = rss_anon()
            rec = reg.recorder(model, f"bench-{keep}", keep=keep)
            built = rss_anon() - before
            times, peaks = [], []
            for _ in range(args.records):
                train_step(step_no)
                step_no += 1
                with PeakSampler() as sampler:
                    sync()
                    t0 = time.perf_counter()
                    rec.record(step_no)
                    times.append(time.perf_counter() - t0)
                peaks.append(sampler.peak - before)
            held = rec.host_bytes()
            rec.finish()
            rec_s = statistics.median(times)
            results[keep] = {
                "record_s": rec_s, "records": times, "rss_after_build": built,
                "rss_peak_during_record": max(peaks), "host_bytes": held,
                "share": {str(k): rec_s / (k * step_s) for k in (1, 10, 100)},
            }
    out = {"device": str(dev), "n_params": n_params, "dtype": "bfloat16",
           "batch": [args.batch, args.seq], "threads": torch.get_num_threads(),
           "step_s": step_s, "steps": steps, "keep": results}
    if args.json:
        print(json.dumps(out, indent=2))
    mib = 1 << 20
    lines = [
        f"Model: TinyLlama, {n_params / 1e6:.1f}M parameters, bf16, AdamW, batch "
        f"{args.batch}x{args.seq}, device `{dev}`, {torch.get_num_threads()} threads. "
        f"Training step (median of {len(steps)}): **{step_s:.2f} s**.",
        "",
        "| keep | one record() | share at every step | every 10 | every 100 | RssAnon "
        "added by the recorder | peak RssAnon during record | packed bits held |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for keep, r in results.items():
        s = r["share"]
        lines.append(
            f"| {keep} | {r['record_s']:.2f} s | {100 * s['1']:.1f}% | {100 * s['10']:.2f}% | "
            f"{100 * s['100']:.3f}% | {r['rss_after_build'] / mib:.0f} MiB | "
            f"{r['rss_peak_during_record'] / mib:.0f} MiB | "
            f"{r['host_bytes']['packed_bits'] / mib:.1f} MiB |")
    lines += [
        "",
        f"bf16 θ0 is {2 * n_params / mib:.0f} MiB: `keep=\"cpu\"` holds it in host memory "
        "(pinned on a GPU run); `keep=\"disk\"` writes it once under the home's `tmp/` and "
        "reads it back one chunk at a time (its pages are page cache, not the process's).",
    ]
    report = "## Live recording: `bench/bench_record.py` (issue 23)\n\n" + "\n".join(lines)
    print(report)
    if not args.no_write:
        write_section(args.out, f"bench_record_{dev.type}", report)


if __name__ == "__main__":
    main()
