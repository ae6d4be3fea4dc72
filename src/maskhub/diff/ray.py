"""A diff as Ray tasks: groups of tensors diffed on the cluster, written straight to the store.

The driver (the process running ``maskhub diff --ray``) opens both checkpoints only to read
their headers, cuts the tensor list into contiguous groups balanced by bytes (about
:data:`TASKS_PER_SLOT` groups per CPU, or per GPU when the tasks use GPUs), creates the
store's root group and starts one task per group. Each task opens the checkpoints itself (so
local paths must be reachable from every node, e.g. on a shared filesystem; Hub repos are
resolved by each worker at the commit the driver resolved), diffs its tensors with the same
pipeline and kernel as a local run (:func:`~maskhub.diff.pipeline.run_diff`, on the node's GPU
when it has one and ``device`` allows it) and writes their arrays into the store: a local
staging directory (shared filesystem) or the remote prefix (``s3://...``). It returns its
per-tensor stats and sweep counts; the driver puts them back in checkpoint order and the
caller writes the metadata and registers the mask once. A task that fails is retried
(:data:`MAX_RETRIES`) and rewrites the same arrays; a diff that fails registers nothing.

Ray is imported here only, on first use.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

from maskhub.checkpoints.sources import Checkpoint, open_checkpoint
from maskhub.core.raytasks import (  # noqa: F401  (plan_groups, MAX_RETRIES: tests, bench)
    MAX_RETRIES,
    TASKS_PER_SLOT,
    connect,
    gather,
    plan_groups,
)
from maskhub.diff.pipeline import DiffOutcome, run_diff
from maskhub.errors import CheckpointMismatchError, UsageError
from maskhub.kernels.device import cuda_available, resolve_stream_device
from maskhub.kernels.kernel import DiffKernel
from maskhub.schemas.metadata import TensorStats
from maskhub.schemas.progress import ProgressFn
from maskhub.storage.store import MaskWriter

#: Test hook: a path; the first task to reach its end creates the file and fails once (after
#: writing its arrays), so the retry has to rewrite them. A path whose directory does not
#: exist makes every attempt of every task fail (retries exhausted). Read on the driver,
#: passed to the tasks.
FAIL_ONCE_ENV = "MASKHUB_TEST_FAIL_ONCE"
class InjectedFailure(RuntimeError):
    """The failure the :data:`FAIL_ONCE_ENV` test hook raises."""


def driver_device(device: str) -> str:
    """Check ``device`` (auto, cpu, cuda[:N]) without requiring a GPU on the driver; return
    the device for work done on the driver itself."""
    if device in ("auto", "cpu"):
        return resolve_stream_device(device)
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        return "cuda" if cuda_available() else "cpu"
    raise UsageError(f"unknown device {device!r}: use auto, cpu or cuda[:N]")


def worker_spec(ck: Checkpoint) -> str:
    """How a worker opens the same checkpoint: ``repo@commit`` for a Hub repo, else the
    absolute path."""
    if ck.revision is not None:
        return f"{ck.ref}@{ck.revision}"
    return str(Path(ck.ref).expanduser().resolve())


def _fail_once(marker: str) -> None:
    if not os.path.isdir(os.path.dirname(os.path.abspath(marker))):
        raise InjectedFailure(f"injected failure on every attempt ({FAIL_ONCE_ENV}={marker})")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    os.close(fd)
    raise InjectedFailure(f"injected failure ({FAIL_ONCE_ENV}={marker})")


def diff_group(base_spec: str, target_spec: str, expect: dict[str, tuple], store: str,
               tol: float, sweep: Sequence[float], device: str, fail_once: str | None = None,
               patch: bool = False) -> tuple[list[TensorStats], list[tuple[str, float, int]],
                          list[tuple[str, int, int, int]], dict[str, bytes], dict[str, bytes],
                          list[str]]:
    """The body of one Ray task: diff the tensors of ``expect`` (``{name: (shape, base dtype,
    target dtype)}``, in checkpoint order) and write their arrays into ``store``; return their
    stats, sweep counts, magnitude strata, both sides' tensor digests and the names whose
    values were written (with ``patch``: the target's values at the set bits). Runs anywhere,
    with or without Ray."""
    base_ck = open_checkpoint(base_spec)
    target_ck = open_checkpoint(target_spec)
    try:
        for name, (shape, a_dtype, b_dtype) in expect.items():
            a, b = base_ck.tensors.get(name), target_ck.tensors.get(name)
            if a is None or b is None or (a.shape, a.dtype, b.dtype) != (shape, a_dtype, b_dtype):
                raise CheckpointMismatchError(
                    f"tensor {name!r} differs between the driver's and the Ray worker's view "
                    f"of the checkpoints (on {socket.gethostname()}): give paths that every "
                    "node reaches on a shared filesystem, or Hub repo ids", name)
        dev = resolve_stream_device("cuda" if device.startswith("cuda") else device)
        kernel = DiffKernel(tol=tol, sweep=sweep, device=dev)
        writer = MaskWriter(store, create=False)
        outcome = run_diff(base_ck, target_ck, list(expect), kernel, writer, patch=patch)
    finally:
        base_ck.close()
        target_ck.close()
    if fail_once:
        _fail_once(fail_once)
    return (outcome.tensors, outcome.sweep, outcome.strata, outcome.base_digests,
            outcome.target_digests, writer.valued)


def ray_diff(address: str | None, base: Checkpoint, target: Checkpoint, names: Sequence[str],
             writer: MaskWriter, *, tol: float, sweep: Sequence[float], device: str = "auto",
             progress: ProgressFn | None = None, patch: bool = False) -> DiffOutcome:
    """Diff ``names`` as Ray tasks writing into ``writer``'s store (created, empty); return
    the outcome in checkpoint order and set ``writer.names`` so that ``writer.finish`` can
    write the metadata. Bits, counts and (with ``patch``) values are those of
    :func:`~maskhub.diff.pipeline.run_diff`.
    """
    ray = connect(address)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if device.startswith("cuda") and gpus == 0:
        raise UsageError(f"--device {device} was asked for but the Ray cluster has no GPU")
    use_gpu = device.startswith("cuda") and gpus > 0  # auto reads on CPUs: resolve_stream_device
    slots = gpus if use_gpu else max(1, int(resources.get("CPU", 1)))
    sizes = [base.tensors[n].nbytes + target.tensors[n].nbytes for n in names]
    groups = plan_groups(sizes, slots * TASKS_PER_SLOT)
    task = ray.remote(diff_group).options(
        num_gpus=1 if use_gpu else 0, num_cpus=1, max_retries=MAX_RETRIES,
        retry_exceptions=[OSError, RuntimeError, ConnectionError, TimeoutError])
    base_spec, target_spec = worker_spec(base), worker_spec(target)
    fail_once = os.environ.get(FAIL_ONCE_ENV) or None
    store = str(writer.path)
    refs = []
    for start, stop in groups:
        expect = {n: (base.tensors[n].shape, base.tensors[n].dtype, target.tensors[n].dtype)
                  for n in names[start:stop]}
        refs.append(task.remote(base_spec, target_spec, expect, store, float(tol),
                                tuple(sweep), device, fail_once, patch))
    results: dict[int, tuple] = {}
    total_bytes, done = sum(sizes), [0, 0]

    def collect(k: int, value: tuple) -> None:
        results[k] = value
        start, stop = groups[k]
        done[0] += stop - start
        done[1] += sum(sizes[start:stop])
        if progress:
            progress(done[0], len(names), done[1], total_bytes, names[stop - 1])

    gather(ray, refs, collect)
    outcome = DiffOutcome()
    for k in range(len(groups)):
        stats, sweep_rows, strata_rows, base_digests, target_digests, valued = results[k]
        writer.valued.extend(valued)
        outcome.base_digests.update(base_digests)
        outcome.target_digests.update(target_digests)
        outcome.tensors.extend(stats)
        outcome.sweep.extend(sweep_rows)
        outcome.strata.extend(strata_rows)
    writer.names = [t.tensor for t in outcome.tensors]
    return outcome
