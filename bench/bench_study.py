"""Wall time of ``maskhub study`` as a user runs it: whole processes, quick and default.

    .venv/bin/python bench/bench_study.py [--sizes quick,default]

Runs each size once as a fresh ``maskhub study`` process in a temporary home and directory
(deleted afterwards), and reports the process's wall time beside the study's own split from
its ``report.json``: training (the trainers, sampling and accuracy evaluations), maskhub
(every diff, overlap, trajectory, compare, verify, plot and the report's queries) and the
rest (imports, start-up, writing the report). Not a test: it writes its section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from report import write_section  # noqa: E402

BIN = Path(sys.executable).parent


def run_size(size: str, work: Path) -> dict:
    """One ``maskhub study`` process of ``size``: its wall time and its report.json."""
    out, home = work / f"study-{size}", work / f"home-{size}"
    cmd = [str(BIN / "maskhub"), "study", "--out", str(out)] + (["--quick"] if size == "quick"
                                                                 else [])
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, env={**os.environ, "MASKHUB_HOME": str(home)},
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    report = json.loads((out / "report.json").read_text())
    return {"wall": wall, "cpu": cpu, "load_after": os.getloadavg()[0], "report": report}


def _row(size: str, r: dict) -> str:
    t = r["report"]["timing"]
    return (f"| {size} | {r['report']['n_params']:,} | {r['report']['size']['seeds']} | "
            f"{r['wall']:.1f} | {r['cpu']:.1f} | {r['load_after']:.2f} | "
            f"{t['training_seconds']:.1f} | {t['maskhub_seconds']:.1f} | "
            f"{r['wall'] - t['training_seconds'] - t['maskhub_seconds']:.1f} |")


def build_report(results: dict[str, dict], load: tuple[float, float, float]) -> str:
    """The BENCHMARKS.md section."""
    lines = ["## The paper in miniature: `bench/bench_study.py` (issue 14)", "",
             "One run of `.venv/bin/python bench/bench_study.py`: each size a fresh "
             "`maskhub study` process (its wall time, start-up included), beside the study's "
             f"own split from its report.json, and the process's CPU time (user + system: the "
             "study trains on one torch thread, so on an idle machine its wall time is close "
             "to its CPU time, which load changes far less). Load average at start "
             f"{load[0]:.2f}.", "",
             "| size | parameters | seeds | process wall (s) | process CPU (s) | load after | "
             "training (s) | maskhub (s) | imports, start-up, report (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [_row(size, r) for size, r in results.items()]
    for size, r in results.items():
        t = r["report"]["timing"]
        runs = ", ".join(f"{k.removeprefix('train_').removesuffix('_seconds')} {v:.1f}"
                         for k, v in t.items() if k.startswith("train_"))
        lines += ["", f"{size}: seconds per run (training and its accuracy evaluations): "
                  f"{runs}.", "", f"{size}: what the run found (from its report):", ""]
        lines += [f"- {f}" for f in r["report"]["findings"]]
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and write the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="quick,default")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="maskhub-study-bench-"))
    try:
        results = {size: run_size(size, work) for size in args.sizes.split(",")}
        report = build_report(results, load)
        write_section(args.out, "bench_study", report)
        print(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
