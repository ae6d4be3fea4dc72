"""Start-up of the light commands, as a user times them: whole processes, side by side.

    .venv/bin/python bench/bench_startup.py

Runs each command as a fresh process (the venv's ``maskhub`` console script) ``--repeats``
times, interleaved round by round with the floor ``python -c "import duckdb, click"`` (what
any DuckDB-over-click tool pays) and ``hf --help`` (huggingface_hub's CLI), and reports the
medians. The registry is a temporary home with two masks and their overlap cached, so
``show`` and ``overlap`` do real lookups. Then, in a fresh venv with maskhub installed
non-editable (``pip install --no-deps .``) and its package made read-only, a CPU diff twice:
the second run shows whether the numba kernels' on-disk cache works there. Not a test: it
writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one process, start to exit (output discarded; it must succeed)."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.decode()}")
    return wall


def make_registry(home: Path, work: Path) -> None:
    """Two masks of a small bf16 pair, their overlap cached (so ``overlap`` is a lookup)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": (torch.randn(512, 256, generator=g)
                                                        * 0.02).to(torch.bfloat16)
            for i in range(4)}
    for seed in (1, 2):
        g2 = torch.Generator().manual_seed(seed)
        target = {k: torch.where(torch.rand(v.shape, generator=g2) < 0.2,
                                 (v.float() + 1e-3).to(torch.bfloat16), v)
                  for k, v in base.items()}
        save_file(target, str(work / f"t{seed}.safetensors"))
    save_file(base, str(work / "base.safetensors"))
    env = {**os.environ, "MASKHUB_HOME": str(home)}
    for seed in (1, 2):
        subprocess.run([str(BIN / "maskhub"), "diff", str(work / "base.safetensors"),
                        str(work / f"t{seed}.safetensors"), "--name", f"seed{seed}",
                        "--algorithm", "dpo", "--seed", str(seed)], env=env, check=True,
                       capture_output=True)
    subprocess.run([str(BIN / "maskhub"), "overlap", "seed1", "seed2"], env=env, check=True,
                   capture_output=True)


def installed_cache_check(work: Path) -> dict[str, float] | None:
    """The numba kernels loaded twice in a fresh non-editable install with a read-only
    package: first run (numba compiles) and second run (cache hit) wall seconds; None where
    the install is not possible."""
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(ROOT)],
                         capture_output=True, text=True, check=False)
    if pip.returncode != 0:
        print(f"non-editable install failed, skipped:\n{pip.stderr}", file=sys.stderr)
        return None
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = next(Path(sys.executable).parent.parent.glob("lib/python3*/site-packages"))
    (site / "deps.pth").write_text(str(deps) + "\n")  # the dependencies, not the editable src
    package = site / "maskhub"
    for p in [package, *package.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    cache = work / "xdg-cache"
    env = {**os.environ, "MASKHUB_HOME": str(work / "home-installed"),
           "XDG_CACHE_HOME": str(cache)}
    env.pop("NUMBA_CACHE_DIR", None)
    # The numba kernels as a large diff loads them (a small diff uses the numpy kernel).
    cmd = [str(venv / "bin" / "python"), "-c",
           "import numpy as np; from maskhub.kernels.kernel import DiffKernel; "
           "a = np.zeros(64, np.uint8); "
           "DiffKernel(backend='numba').run_raw(a, a, 'bfloat16', 'bfloat16', 32)"]
    first = timed(cmd, env)
    second = timed(cmd, env)
    root_note = os.geteuid() == 0  # root writes through a read-only mode: cache in-tree then
    for p in [package, *package.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    return {"first": first, "second": second, "as_root": float(root_note)}


def main() -> None:
    """Run the benchmark and write the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="maskhub-startup-"))
    try:
        home = work / "home"
        make_registry(home, work)
        env = {**os.environ, "MASKHUB_HOME": str(home)}
        mh = str(BIN / "maskhub")
        commands = {
            'python -c "import duckdb, click"  (floor)': [sys.executable, "-c",
                                                         "import duckdb, click"],
            "hf --help": [str(BIN / "hf"), "--help"],
            "maskhub --help": [mh, "--help"],
            "maskhub ls": [mh, "ls"],
            'maskhub sql "select ..."': [mh, "sql", "select name, sparsity from masks"],
            "maskhub show seed1": [mh, "show", "seed1"],
            "maskhub diff --help": [mh, "diff", "--help"],
            "maskhub overlap seed1 seed2 (cached)": [mh, "overlap", "seed1", "seed2"],
        }
        if not (BIN / "hf").exists():
            del commands["hf --help"]
        times: dict[str, list[float]] = {k: [] for k in commands}
        for cmd in commands.values():  # one untimed run each: warm the OS caches
            timed(cmd, env)
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                times[name].append(timed(cmd, env))
        installed = installed_cache_check(work)
        report = build_report(args, load, times, installed)
        write_section(args.out, "bench_startup", report)
        print(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_report(args: argparse.Namespace, load: tuple[float, float, float],
                 times: dict[str, list[float]], installed: dict[str, float] | None) -> str:
    """The BENCHMARKS.md section."""
    med = {k: statistics.median(v) for k, v in times.items()}
    floor_key = next(k for k in med if k.endswith("(floor)"))
    floor = med[floor_key]
    lines = [
        "## Start-up: `bench/bench_startup.py` (issue 11)", "",
        f"One run of `.venv/bin/python bench/bench_startup.py` ({args.repeats} rounds, each "
        "command a fresh process, rounds interleaved so that load hits every row alike; "
        f"load average at start {load[0]:.2f}). Registry: two masks, their overlap cached.",
        "",
        "| command | median (s) | min (s) | x floor | target <= 2x floor |",
        "|---|---:|---:|---:|---|",
    ]
    for k, v in med.items():
        light = k.startswith("maskhub")
        lines.append(f"| `{k}` | {v:.3f} | {min(times[k]):.3f} | {v / floor:.2f} | "
                     f"{('yes' if v <= 2 * floor else '**no**') if light else ''} |")
    lines += ["", "Before this change (issue 11, same machine): `maskhub --help` 3.5 s, `ls` "
              "3.6-4.9 s, `sql` about the same, because every command imported torch, zarr "
              "and numba."]
    if installed is not None:
        lines += [
            "", "Non-editable install (`pip install --no-deps .` into a fresh venv, the "
            "package made read-only): a process that imports the numba diff kernels and runs "
            "them once, as a diff above 1 GiB of input does, twice: first run "
            f"{installed['first']:.2f} s (numba compiles the kernels), second run "
            f"{installed['second']:.2f} s (kernels loaded from the on-disk cache)."
            + (" This ran as root, which writes through a read-only mode, so the cache may "
               "have gone next to the package; as an unprivileged user with an unwritable "
               "~/.cache/numba, maskhub puts it in $XDG_CACHE_HOME/maskhub/numba "
               "(tests/test_kernel.py)." if installed["as_root"] else "")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
