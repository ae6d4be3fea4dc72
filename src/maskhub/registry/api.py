"""The Python API: :class:`Registry` (a maskhub home) and :class:`Mask` (a registered mask).

The facade: each method is the library call of the CLI command of the same name, and
delegates to the feature that implements it (:mod:`maskhub.diff`, :mod:`maskhub.analytics`,
:mod:`maskhub.hub`, :mod:`maskhub.training`, :mod:`maskhub.demo`), imported on first use, so
that opening a registry and querying it costs neither torch nor zarr nor numba.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskhub.core.home import Home
from maskhub.core.record import MaskRecord
from maskhub.errors import UsageError
from maskhub.storage.remote import is_url

if TYPE_CHECKING:
    import duckdb
    import torch

    from maskhub.analytics.compare import CompareReport
    from maskhub.analytics.overlap import OverlapMatrix, OverlapResult
    from maskhub.analytics.trajectory import TrajectoryResult
    from maskhub.hub.pull import PullResult
    from maskhub.hub.push import PushResult
    from maskhub.maintenance.fsck import FsckReport
    from maskhub.schemas.progress import ProgressFn
    from maskhub.training.verify import VerifyReport


class Mask(MaskRecord):
    """A registered mask: its metadata, per-tensor stats and bits."""

    registry: Registry

    def to_torch(self, tensor: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Boolean mask of one tensor as a torch tensor."""
        import torch

        return torch.from_numpy(self[tensor]).to(device)

    # -- Hugging Face Hub (maskhub.hub) ---------------------------------------------------

    @classmethod
    def from_hub(cls, repo_id: str, revision: str | None = None,
                 home: str | os.PathLike[str] | None = None, *, name: str | None = None,
                 repo_type: str = "model", token: str | None = None) -> Mask:
        """Pull the mask of Hub repo ``repo_id`` (``org/name[@rev]``) into the registry at
        ``home`` (verified; a no-op when that commit is already there) and return it."""
        return Registry(home).pull(repo_id, revision, name=name, repo_type=repo_type,
                                   token=token).mask

    def push_to_hub(self, repo_id: str, *, private: bool = False, revision: str | None = None,
                    commit_message: str | None = None, repo_type: str = "model",
                    license: str | None = None, token: str | None = None) -> PushResult:
        """Push this mask to ``repo_id`` in one commit (see :meth:`Registry.push`)."""
        return self.registry.push(self.id, repo_id, private=private, revision=revision,
                                  commit_message=commit_message, repo_type=repo_type,
                                  license=license, token=token)

    # -- issue 26: metadata edits (maskhub.maintenance.edit) ------------------------------

    def update(self, **changes: Any) -> Mask:
        """Correct this mask's metadata (``name``, ``base_model``, ``algorithm``, ``seed``,
        ``dataset``, ``tags``, ``notes``...), recorded; returns the mask as now registered
        (see :meth:`Registry.edit`)."""
        return self.registry.edit(self.id, **changes)


class Registry(Home):
    """A maskhub home: the mask stores and the SQL index ``registry.duckdb``.

    ``Registry(home=None, store=None)``: see :class:`maskhub.core.home.Home`.
    """

    record_class = Mask

    def get(self, ref: str) -> Mask:
        """The mask named ``ref``, or whose id starts with ``ref``."""
        mask = super().get(ref)
        assert isinstance(mask, Mask)
        return mask

    # -- the index -----------------------------------------------------------------------

    def ls(self, where: str | None = None) -> list[dict[str, Any]]:
        """Rows of the ``masks`` table, newest first (``where``: an optional SQL filter)."""
        sql = "SELECT * FROM masks"
        if where:  # user-written: one read-only statement, errors as one line (UsageError)
            sql += f" WHERE {where}\n"
        return self.index.user_rows(sql + " ORDER BY created_at DESC, name")

    def sql(self, query: str) -> tuple[list[str], list[tuple]]:
        """Run a read-only SQL query over the index; return ``(columns, rows)``."""
        return self.index.query(query)

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A read-only DuckDB connection to a snapshot of the index, for notebooks: query the
        tables (``masks``, ``tensors``, ``mask_tensors``, ``overlaps``...) as long as you like;
        it holds no lock on ``registry.duckdb``, so ``maskhub`` commands that write never wait
        for it. It shows the registry as it was when taken: call again for newer rows."""
        return self.index.snapshot()

    def show(self, ref: str) -> dict[str, Any]:
        """Summary of one mask: its row, per-layer and per-module tables, the sweep, and the
        ``--rank/--stats`` summary (see :func:`maskhub.analytics.summary.mask_summary`)."""
        from maskhub.analytics.summary import mask_summary

        return mask_summary(self, ref)

    def tensor_density(self, ref: str, tensor: str, rows: int = 16,
                       cols: int = 64) -> dict[str, Any]:
        """One tensor's mask as a grid of densities (``maskhub show MASK --tensor NAME``);
        see :func:`maskhub.analytics.summary.tensor_density`."""
        from maskhub.analytics.summary import tensor_density

        return tensor_density(self, ref, tensor, rows, cols)

    def rm(self, ref: str) -> Mask:
        """Unregister a mask and delete its store; returns the removed mask. Masks derived
        from it (:meth:`derived_from`) stay, their lineage still naming its id."""
        mask = self.get(ref)
        self.remove(mask)
        return mask

    def edit(self, ref: str, **changes: Any) -> Mask:
        """Correct a mask's metadata after the fact (the library call of ``maskhub edit``):
        ``name``, ``base_model``, ``base_revision``, ``target_model``, ``target_revision``,
        ``algorithm``, ``seed``, ``dataset``, ``tags`` (the new list), ``notes``; ``None``
        leaves a field as it is. The index row and the store's attributes change together;
        each change is recorded in ``masks.edits`` (and ``masks.edited_at``). Bits, counts and
        fingerprints are not editable. See :mod:`maskhub.maintenance.edit`."""
        from maskhub.maintenance.edit import edit

        mask = edit(self, self.get(ref), changes)
        assert isinstance(mask, Mask)
        return mask

    def export(self, ref: str, out: str | os.PathLike[str], *, layout: str = "bool") -> Path:
        """Write a mask as one ``.safetensors`` file (the library call of ``maskhub export``):
        ``layout="bool"``, one boolean tensor per parameter (``maskhub import`` reads it
        back), or ``"packed"``, the packed bits as ``uint8``; see
        :mod:`maskhub.ingest.export`."""
        from maskhub.ingest.export import export

        return export(self.get(ref), out, layout)

    def fsck(self, repair: bool = False) -> FsckReport:
        """Check that the index and the stores agree (rows and stores, arrays, interrupted
        writes, staging, lineage, overlap cache, migrations); with ``repair``, fix what can
        be fixed. See :mod:`maskhub.maintenance.fsck`."""
        from maskhub.maintenance.fsck import fsck

        return fsck(self, repair=repair)

    # -- diff (maskhub.diff) -------------------------------------------------------------

    def diff(
        self,
        base: str | os.PathLike[str],
        target: str | os.PathLike[str],
        *,
        name: str | None = None,
        algorithm: str | None = None,
        seed: int | None = None,
        dataset: str | None = None,
        tol: float = 1e-5,
        sweep: Sequence[float] = (),
        device: str = "auto",
        allow_missing: bool = False,
        base_model: str | None = None,
        target_model: str | None = None,
        tags: Sequence[str] = (),
        notes: str | None = None,
        rank: bool = False,
        stats: bool = False,
        ray: str | None = None,
        force: bool = False,
        progress: ProgressFn | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> Mask:
        """Diff ``target`` against ``base`` and register the mask of updated parameters.

        ``base``/``target``: a ``.safetensors`` file, a directory (single file or sharded with
        ``model.safetensors.index.json``) or a Hub repo id ``org/name[@revision]``.
        ``tol``: a parameter is updated iff ``|target - base| > tol``. ``sweep``: extra
        tolerances whose per-tensor counts are recorded too. ``base_model``/``target_model``
        override the recorded model names (default: the repo id or the absolute path).
        ``rank``: also record the numerical rank of every 2-D update (the paper's Table 2);
        ``stats``: sign flips and |Δ| statistics per tensor (both into ``tensor_analysis``,
        computed in a second streaming pass; see :mod:`maskhub.diff.analysis`).
        ``ray``: run the diff as Ray tasks over groups of tensors, each writing its arrays
        straight into the store: a cluster address, or ``"auto"`` for ``ray.init()``
        (``RAY_ADDRESS`` or a local Ray); see :mod:`maskhub.diff.ray`. Same bits.
        With a remote store (``Registry(store=...)``) the store is written to that URL.
        A CPU diff never imports torch (only ``rank``/``stats`` and CUDA do).
        The diff records a content fingerprint of each side (``base_fingerprint``,
        ``target_fingerprint``: :mod:`maskhub.checkpoints.fingerprint`). Without ``name``, a
        diff identical to a registered one (same fingerprints, tol and sweep) registers
        nothing and returns that mask (``mask.reused`` is True); ``force`` registers a copy.
        """
        from maskhub.diff.run import diff

        mask = diff(self, base, target, name=name, algorithm=algorithm, seed=seed,
                    dataset=dataset, tol=tol, sweep=sweep, device=device,
                    allow_missing=allow_missing, base_model=base_model,
                    target_model=target_model, tags=tags, notes=notes, rank=rank, stats=stats,
                    ray=ray, force=force, progress=progress, warn=warn)
        assert isinstance(mask, Mask)
        return mask

    # -- masks made elsewhere (maskhub.ingest) ---------------------------------------------

    def add(self, source: str | os.PathLike[str] | Mapping[str, Any], *,
            name: str | None = None, base_model: str | None = None,
            target_model: str | None = None, base_revision: str | None = None,
            target_revision: str | None = None, tol: float | None = None,
            algorithm: str | None = None, seed: int | None = None, dataset: str | None = None,
            tags: Sequence[str] = (), notes: str | None = None,
            progress: ProgressFn | None = None) -> Mask:
        """Register a mask made elsewhere (the library call of ``maskhub import``, a Python
        keyword): ``source`` is a Zarr v3 store in the documented layout, a ``.safetensors``
        file of ``bool``/``uint8`` masks, or a mapping ``{parameter name: numpy array or torch
        tensor}``. ``base_model`` is required unless the store records it; the other
        arguments override the store's attributes. Checked like a pull (shapes, counts,
        names); no magnitude strata (they need θ0). See :mod:`maskhub.ingest.add`."""
        from maskhub.ingest.add import add

        mask = add(self, source, name=name, base_model=base_model, target_model=target_model,
                   base_revision=base_revision, target_revision=target_revision, tol=tol,
                   algorithm=algorithm, seed=seed, dataset=dataset, tags=tags, notes=notes,
                   progress=progress)
        assert isinstance(mask, Mask)
        return mask

    def demo(self, directory: Path | None = None,
             progress_cb: ProgressFn | None = None) -> dict[str, Any]:
        """Make the embedded demo checkpoint pair (see :mod:`maskhub.demo.pair`) and diff it.

        Returns ``{"mask", "base", "target", "losses"}``.
        """
        from maskhub.demo.pair import make_demo_pair

        self.check_writable()  # before training: the demo registers a mask
        directory = directory or self.home / "demo"
        base, target, losses = make_demo_pair(directory)
        mask = self.diff(base, target, name=self.default_name("demo"), algorithm="demo",
                         seed=0, dataset="synthetic-affine", sweep=(0, 1e-8, 1e-7, 1e-6, 1e-5),
                         base_model="maskhub-demo/tiny-llama-sft",
                         target_model="maskhub-demo/tiny-llama-ft", progress=progress_cb)
        return {"mask": mask, "base": base, "target": target, "losses": losses}

    # -- overlap analytics (maskhub.analytics) -------------------------------------------

    def overlap(self, a: str, b: str, *, refresh: bool = False,
                progress: ProgressFn | None = None) -> OverlapResult:
        """Overlap of mask ``a`` (I1) with mask ``b`` (I2): counts, o1/o2, Jaccard, uniform
        and stratified random baselines, z-score; cached in the ``overlaps`` table."""
        from maskhub.analytics.overlap import overlap

        return overlap(self, a, b, refresh=refresh, progress=progress)

    def overlap_all(self, refs: Sequence[str] = (), *, base_model: str | None = None,
                    refresh: bool = False, progress: ProgressFn | None = None,
                    ray: str | None = None) -> OverlapMatrix:
        """Every pair among ``refs`` (default: the masks of ``base_model``, or all masks when
        they share one base model), counted in one pass that reads each mask once.
        ``ray``: count as Ray tasks (a cluster address, or ``"auto"``); same counts."""
        from maskhub.analytics.overlap import overlap_all, select_masks

        masks = select_masks(self, refs, base_model)
        return overlap_all(self, masks, refresh=refresh, progress=progress, ray=ray)

    def combine(self, operation: str, refs: Sequence[str], *, name: str | None = None,
                min_count: int | None = None, notes: str | None = None,
                progress: ProgressFn | None = None) -> Mask:
        """Register ``intersect``/``union``/``difference``/``consensus`` of masks as a new
        mask with its lineage (see :mod:`maskhub.analytics.combine`)."""
        from maskhub.analytics.combine import combine

        masks = [self.get(r) for r in refs]
        mask = combine(self, operation, masks, name=name, min_count=min_count, notes=notes,
                       progress=progress)
        assert isinstance(mask, Mask)
        return mask

    def plot(self, refs: Sequence[str], output: str | os.PathLike[str], *,
             kind: str | None = None, base_model: str | None = None,
             baseline: str = "stratified", size: tuple[int, int] | None = None,
             refresh: bool = False, progress: ProgressFn | None = None) -> Path:
        """Draw a figure into ``output`` and return its path. ``kind="sparsity"``: the layer x
        module heatmap of one mask; ``kind="overlap"``: the overlap matrix of several masks
        with a random baseline. Default: sparsity for one mask, overlap otherwise."""
        from maskhub.analytics.plot import plot_overlap, plot_sparsity

        kind = kind or ("sparsity" if len(refs) == 1 and base_model is None else "overlap")
        if kind == "sparsity":
            if len(refs) != 1:
                raise UsageError("a sparsity plot shows exactly one mask")
            return plot_sparsity(self, self.get(refs[0]), output, size)
        if kind != "overlap":
            raise UsageError(f"unknown plot kind {kind!r}; choose sparsity or overlap")
        matrix = self.overlap_all(refs, base_model=base_model, refresh=refresh,
                                  progress=progress)
        return plot_overlap(matrix, output, baseline, size)

    def trajectory(self, checkpoints: Sequence[str], *, name: str | None = None,
                   tol: float = 1e-5, device: str = "auto", algorithm: str | None = None,
                   seed: int | None = None, dataset: str | None = None,
                   tags: Sequence[str] = (),
                   progress: ProgressFn | None = None) -> TrajectoryResult:
        """Measure a sequence of checkpoints (or one directory of them, ordered by step):
        sparsity against the first and between consecutive ones, the ever-updated set (updated
        against the first at some checkpoint), the Figure 6 share and the never / cancelled /
        subnetwork split; registers ``NAME-final`` and ``NAME-ever`` with the run's
        ``algorithm``, ``seed``, ``dataset`` and ``tags``."""
        from maskhub.analytics.trajectory import run_trajectory
        from maskhub.kernels.device import resolve_device

        return run_trajectory(self, checkpoints, name=name, tol=tol,
                              device=resolve_device(device), algorithm=algorithm, seed=seed,
                              dataset=dataset, tags=tags, progress=progress)

    def compare(self, a: str | os.PathLike[str], b: str | os.PathLike[str], *,
                mask: str | Any | None = None, tols: Sequence[float] = (1e-5,),
                device: str = "auto", allow_missing: bool = False,
                progress: ProgressFn | None = None,
                warn: Callable[[str], None] | None = None) -> CompareReport:
        """How much checkpoints ``a`` and ``b`` (two fine-tunings of one base, e.g. θ_sub and
        θ_full of Conjecture 1) agree: the share of entries with ``|a − b| <= tol`` for each
        of ``tols``, overall and inside / outside ``mask`` (a name, id prefix or
        :class:`Mask`). Registers nothing. See :mod:`maskhub.analytics.compare`."""
        from maskhub.analytics.compare import compare
        from maskhub.kernels.device import resolve_device

        source = self.get(mask) if isinstance(mask, str) else mask
        return compare(a, b, mask=source, tols=tols, device=resolve_device(device),
                       allow_missing=allow_missing, progress=progress, warn=warn)

    # -- Hugging Face Hub (maskhub.hub) ---------------------------------------------------

    def push(self, ref: str, repo_id: str, *, private: bool = False,
             revision: str | None = None, commit_message: str | None = None,
             repo_type: str = "model", license: str | None = None,
             token: str | None = None, notice: Callable[[str], None] | None = None,
             progress: bool = True) -> PushResult:
        """Upload mask ``ref`` to Hub repo ``repo_id`` in one commit (Zarr store,
        maskhub.json with every file's sha256, tensors.parquet, model card), creating the repo
        and branch ``revision`` if needed; record the repo and commit in the index. An
        unchanged mask makes no new commit. ``notice``/``progress``: where huggingface_hub's
        messages go, as short lines, and whether its progress bars show (see
        :func:`maskhub.hub.pull.pull`). See :mod:`maskhub.hub.push`."""
        from maskhub.hub.push import push

        path = self.get(ref).path
        if is_url(path):
            raise UsageError(f"mask {ref!r} is stored at {path}; push publishes local stores "
                             "only (copy it under HOME/masks first)")
        return push(self, ref, repo_id, private=private, revision=revision,
                    commit_message=commit_message, repo_type=repo_type, license=license,
                    token=token, notice=notice, progress=progress)

    def pull(self, repo_id: str, revision: str | None = None, *, name: str | None = None,
             repo_type: str = "model", token: str | None = None,
             notice: Callable[[str], None] | None = None, progress: bool = True
             ) -> PullResult:
        """Download, verify (versions, paths, every sha256, arrays vs metadata) and register
        the mask of Hub repo ``repo_id`` at ``revision``; a no-op for a commit already
        pulled. Works offline for a cached revision. ``notice``/``progress``: where
        huggingface_hub's messages go, as short lines ("retrying 2/5 after a dropped
        connection"), and whether its progress bars show. See :mod:`maskhub.hub.pull`."""
        from maskhub.hub.pull import pull

        return pull(self, repo_id, revision, name=name, repo_type=repo_type, token=token,
                    notice=notice, progress=progress)

    def search(self, *, base_model: str | None = None, algorithm: str | None = None,
               repo_type: str = "model", limit: int = 50,
               token: str | None = None) -> list[dict[str, Any]]:
        """Mask repos on the Hub (tag ``maskhub``), filtered by base model and algorithm."""
        from maskhub.hub.search import search

        return search(base_model=base_model, algorithm=algorithm, repo_type=repo_type,
                      limit=limit, token=token)

    # -- masked training (maskhub.training; training itself: maskhub.torch) --------------

    def verify(self, mask: str | Any, base: str | os.PathLike[str],
               trained: str | os.PathLike[str], *, tol: float | str = 0.0, device: str = "auto",
               allow_missing: bool = False, progress: ProgressFn | None = None,
               warn: Callable[[str], None] | None = None) -> VerifyReport:
        """Diff ``trained`` against ``base`` and count, per tensor, the entries that changed
        by more than ``tol`` outside ``mask`` (a name, id prefix or :class:`Mask`); the
        report's ``ok`` is False if any did. ``tol="mask"``: the tolerance the mask was made
        with (a full run checked against its own mask). The default 0 is the exact-mode
        guarantee: nothing outside the mask changed at all. See
        :mod:`maskhub.training.verify`."""
        from maskhub.kernels.device import resolve_device
        from maskhub.kernels.kernel import check_tolerance
        from maskhub.training.verify import mask_tolerance, verify_mask

        source = self.get(mask) if isinstance(mask, str) else mask
        if tol == "mask":
            own = mask_tolerance(source)
            if own is None:
                raise UsageError("--tol mask needs a registered mask (this one records no "
                                 "tolerance); give a number")
            tol = own
        check_tolerance(tol)
        return verify_mask(source, base, trained, tol=tol, device=resolve_device(device),
                           allow_missing=allow_missing, progress=progress, warn=warn)
