"""Issue 21, item 7: seeded fuzzing of what maskhub reads from outside. Hundreds of mutated
safetensors headers (shapes, offsets, dtypes, header length, JSON nesting, truncation, names,
``__metadata__``) and Zarr mask stores (``zarr.json`` fields and attributes, group metadata,
chunk bytes, decompression bombs, deleted chunks, symlinks out of the store, FIFOs, directories
where files belong) go through ``maskhub diff`` and ``maskhub import``.

Every outcome must be exit 0 with a registered mask that validates, or exit 1 with exactly one
``Error:`` line: no traceback, no hang (an alarm per case and a time limit on the process),
no allocation beyond a bound (an address-space cap on the process).

Most cases run in one child process through click's runner (:mod:`fuzz_cases`: starting
maskhub once, not per case, keeps the test within a minute on a loaded 2-core machine); a few
run as real ``maskhub`` processes, each under ``timeout`` and the same cap.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import fuzz_cases

SEED = 21
N_SAFETENSORS = 110
N_ZARR = 110
#: Address space of the fuzzing processes: a maskhub import maps ~1.5 GB at start (thread
#: stacks and arenas included); a declared 2^40-byte array would need far more.
ADDRESS_SPACE = 6 << 30
DRIVER_TIMEOUT = 240


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _env(home: Path) -> dict[str, str]:
    src = str(Path(__file__).resolve().parent.parent / "src")
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "MASKHUB_HOME": str(home),
            "PYTHONPATH": src + (os.pathsep + path if path else "")}


def test_fuzzed_headers_and_stores_end_cleanly(tmp_path: Path) -> None:
    driver = Path(fuzz_cases.__file__)
    proc = subprocess.run(
        [sys.executable, str(driver), str(tmp_path / "cases"), str(SEED), str(N_SAFETENSORS),
         str(N_ZARR)], env=_env(tmp_path / "home"), capture_output=True, text=True,
        timeout=DRIVER_TIMEOUT, preexec_fn=_cap_memory)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == N_SAFETENSORS + N_ZARR
    bad = [f"{r['label']}: {r['args']}: {r['problem']}" for r in results if r["problem"]]
    assert bad == [], "\n\n".join(bad[:5])
    # The mutations reach both outcomes and every class of input.
    outcomes = {r["exit"] for r in results}
    assert outcomes == {0, 1}, outcomes
    labels = " ".join(r["label"] for r in results)
    for what in ("shape", "offsets", "dtype", "length", "truncate", "metadata", "array.",
                 "group.", "chunk-bytes", "chunk-symlink", "fifo", "json-garbage"):
        assert what in labels, what


def test_fuzzed_cases_as_real_processes(tmp_path: Path) -> None:
    """A sample of the cases (every FIFO and out-of-store symlink among the first ones, and
    some at random) as separate ``maskhub`` processes: killed by ``timeout`` if one blocked."""
    cases = fuzz_cases.build(tmp_path / "cases", SEED + 1, 30, 40)
    risky = [c for c in cases if "fifo" in c.label or "/dev/zero" in c.label][:3]
    rng = random.Random(SEED)
    sample = risky + rng.sample([c for c in cases if c not in risky], 6 - len(risky))
    exe = shutil.which("maskhub", path=str(Path(sys.executable).parent)) or "maskhub"
    procs = [subprocess.Popen(["timeout", "-s", "KILL", "120", exe, *c.args],
                              env=_env(tmp_path / f"home{i}"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, preexec_fn=_cap_memory)
             for i, c in enumerate(sample)]
    for case, proc in zip(sample, procs, strict=True):
        out, err = proc.communicate(timeout=180)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert "Traceback" not in err, (case.label, err)
        if proc.returncode == 0:
            continue
        assert proc.returncode == 1, (case.label, proc.returncode, err)  # not killed (-9/137)
        assert len(lines) == 1 and lines[0].startswith("Error: "), (case.label, err)
    assert risky, [c.label for c in cases]
