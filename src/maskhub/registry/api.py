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
from maskhub.schemas.names import PEFT_EXCLUDE
from maskhub.storage.index import MASK_COLUMNS
from maskhub.storage.sandbox import DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    import duckdb
    import torch

    from maskhub.analytics.compare import CompareReport
    from maskhub.analytics.overlap import OverlapMatrix, OverlapResult
    from maskhub.analytics.trajectory import TrajectoryResult
    from maskhub.diff.apply import ApplyResult
    from maskhub.hub.pull import PullResult
    from maskhub.hub.push import PushResult
    from maskhub.ingest.peft_export import PeftExport
    from maskhub.maintenance.fsck import FsckReport
    from maskhub.schemas.progress import ProgressFn
    from maskhub.training.recorder import Recorder
    from maskhub.training.verify import VerifyReport


#: The column that carries ``count(*) OVER ()`` through :meth:`Registry.ls`'s query.
_TOTAL = "__maskhub_total"


class MaskListing(list):
    """The rows :meth:`Registry.ls` returns (dicts), with ``total``: how many rows matched
    before ``limit``."""

    total: int = 0


class Mask(MaskRecord):
    """A registered mask: its metadata, per-tensor stats and bits."""

    registry: Registry

    def to_torch(self, tensor: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Boolean mask of one tensor as a torch tensor."""
        import torch

        return torch.from_numpy(self[tensor]).to(device)

    def apply_to(self, model: torch.nn.Module, *, strip_prefix: str | None = None,
                 add_prefix: str | None = None, name_map: Any = None,
                 extra: str = "error") -> int:
        """Write this patch's values into ``model`` (which holds the patch's base) in place,
        on whatever device each parameter lives, and return the number of entries written:
        the model then holds the target (bit for bit in the target's dtypes). Names map as in
        :func:`maskhub.torch.apply_mask` (``strip_prefix``, ``add_prefix``, ``name_map``);
        ``extra="ignore"`` skips patch tensors the model lacks. A mask without values raises
        :class:`~maskhub.errors.PatchError`. See :mod:`maskhub.training.patching`."""
        from maskhub.training.patching import apply_patch

        return apply_patch(model, self, strip_prefix=strip_prefix, add_prefix=add_prefix,
                           name_map=name_map, extra=extra)

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

    # -- ls and sql: user-written SQL, run in the SQL sandbox (issue 21/25) -----------------

    def ls(self, where: str | None = None, *, limit: int | None = None,
           sort: str | None = None, descending: bool = False,
           timeout: float | None = DEFAULT_TIMEOUT_S) -> MaskListing:
        """Rows of the ``masks`` table, newest first (then by name).

        ``where``: an optional SQL filter on ``masks``, run in the SQL sandbox
        (:mod:`maskhub.storage.sandbox`) for at most ``timeout`` seconds. ``sort``: a column
        of ``masks`` to order by instead (a leading ``-``, or ``descending``, reverses it;
        ties by name). ``limit``: at most that many rows (``None``/``0``: all), fetched with
        SQL's ``LIMIT``. The result is a list of dicts whose ``total`` attribute counts every
        row matching ``where``.
        """
        order = "created_at DESC, name"
        if sort:
            column = sort[1:] if sort.startswith("-") else sort
            if column not in MASK_COLUMNS:
                raise UsageError(f"cannot sort by {column!r}: not a column of masks (one of "
                                 f"{', '.join(MASK_COLUMNS)})")
            direction = "DESC" if descending or sort.startswith("-") else "ASC"
            order = f'"{column}" {direction} NULLS LAST, name'
        if limit is not None and limit < 0:
            raise UsageError(f"--limit must be 0 (all) or more, not {limit}")
        sql = f"SELECT *, count(*) OVER () AS {_TOTAL} FROM masks"
        if where:  # user-written: one read-only statement, errors as one line (UsageError)
            sql += f" WHERE {where}\n"
        sql += f" ORDER BY {order}" + (f" LIMIT {int(limit)}" if limit else "")
        rows = self.index.user_rows(sql, timeout)
        listing = MaskListing(rows)
        listing.total = rows[0][_TOTAL] if rows else 0
        for r in listing:
            del r[_TOTAL]
        return listing

    def sql(self, query: str, timeout: float | None = DEFAULT_TIMEOUT_S
            ) -> tuple[list[str], list[tuple]]:
        """Run a read-only SQL query over the index in the SQL sandbox (the registry's tables
        and views, no other file, no network, no extension, no setting: see
        :mod:`maskhub.storage.sandbox`), stopped after ``timeout`` seconds (``None``/``0``:
        no limit); return ``(columns, rows)``."""
        return self.index.query(query, timeout)

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A read-only DuckDB connection to a snapshot of the index, for notebooks: query the
        tables (``masks``, ``tensors``, ``mask_tensors``, ``overlaps``...) as long as you like;
        it holds no lock on ``registry.duckdb``, so ``maskhub`` commands that write never wait
        for it. It shows the registry as it was when taken: call again for newer rows."""
        return self.index.snapshot()

    def show(self, ref: str, control: str | None = None) -> dict[str, Any]:
        """Summary of one mask: its row, per-layer and per-module tables, the sweep, and the
        ``--rank/--stats`` summary (see :func:`maskhub.analytics.summary.mask_summary`).
        ``control``: a second mask set beside it (``"control"``: e.g. the diff of the same
        run's fp32 masters; :func:`maskhub.analytics.summary.control_summary`)."""
        from maskhub.analytics.summary import control_summary, mask_summary

        info = mask_summary(self, ref)
        if control is not None:
            info["control"] = control_summary(self, ref, control)
        return info

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

    # --- issue 26: a mask as a plain-PEFT SHiRA adapter ---
    def export_peft(self, ref: str, out: str | os.PathLike[str], *,
                    exclude: str | None = PEFT_EXCLUDE) -> PeftExport:
        """Write a mask as a SHiRA adapter directory in PEFT's own format (the library call
        of ``maskhub export MASK DIR --peft``): ``PeftModel.from_pretrained(base, out)``
        loads it without maskhub. ``exclude``: a regex of 2-D weights to leave out (default:
        embeddings). See :mod:`maskhub.ingest.peft_export`."""
        from maskhub.ingest.peft_export import export_peft

        return export_peft(self.get(ref), out, exclude)

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
        tol: float | None = None,
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
        patch: bool = False,
        budget: float | None = None,
    ) -> Mask:
        """Diff ``target`` against ``base`` and register the mask of updated parameters.

        ``base``/``target``: a ``.safetensors`` file, a directory (single file or sharded with
        ``model.safetensors.index.json``) or a Hub repo id ``org/name[@revision]``.
        ``tol``: a parameter is updated iff ``|target - base| > tol`` (default ``1e-5``; ``0``
        with ``patch``). ``patch``: also store the target's values at the set bits, so that
        :meth:`apply` rebuilds the target from the base; at ``tol = 0`` (its default) the
        mask then holds every entry whose bits differ (also +0 vs -0 and NaN payloads, which
        ``tol = 0`` alone counts as unchanged) and the rebuild is bit for bit; at ``tol > 0``
        it is not (``warn`` says so). ``sweep``: extra
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
        ``budget``: the movement budget of the precision null (entries whose smallest
        recordable change at their |θ0| exceeds it could not have changed; see
        :mod:`maskhub.kernels.precision`); default the largest |Δ| observed.
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
                    ray=ray, budget=budget, force=force, progress=progress, warn=warn,
                    patch=patch)
        assert isinstance(mask, Mask)
        return mask

    # -- patches: a mask with the target's values (maskhub.diff.apply) ----------------------

    def apply(self, mask: str | Mask, base: str | os.PathLike[str],
              out: str | os.PathLike[str], *, progress: ProgressFn | None = None,
              warn: Callable[[str], None] | None = None,
              notice: Callable[[str], None] | None = None) -> ApplyResult:
        """Rebuild the target of patch ``mask`` (a name, id prefix, :class:`Mask`, or a Hub
        repo id ``org/name[@rev]``, pulled first) from ``base`` into the new directory
        ``out``: safetensors laid out like ``base`` (same shard names and index), in the
        target's dtypes, bit for bit the target for a patch made at ``tol = 0``. ``base``
        must be the patch's base (same tensor names, shapes and dtypes), else
        :class:`~maskhub.errors.MaskMismatchError`; a mask without values raises
        :class:`~maskhub.errors.PatchError`. Streams one tensor at a time; no torch."""
        from maskhub.diff.apply import apply

        if isinstance(mask, str) and "/" in mask:
            from maskhub.checkpoints.sources import split_revision

            repo, rev = split_revision(mask)
            mask = self.pull(repo, rev, notice=notice, progress=False).mask  # type: ignore[assignment]
        record = mask if isinstance(mask, MaskRecord) else self.get(mask)
        return apply(record, base, out, progress=progress, warn=warn)

    # -- masks made elsewhere (maskhub.ingest) ---------------------------------------------

    def add(self, source: str | os.PathLike[str] | Mapping[str, Any], *,
            name: str | None = None, base_model: str | None = None,
            target_model: str | None = None, base_revision: str | None = None,
            target_revision: str | None = None, tol: float | None = None,
            algorithm: str | None = None, seed: int | None = None, dataset: str | None = None,
            tags: Sequence[str] = (), notes: str | None = None,
            base: str | os.PathLike[str] | None = None,
            progress: ProgressFn | None = None,
            warn: Callable[[str], None] | None = None) -> Mask:
        """Register a mask made elsewhere (the library call of ``maskhub import``, a Python
        keyword): ``source`` is a Zarr v3 store in the documented layout, a ``.safetensors``
        file of ``bool``/``uint8`` masks, or a mapping ``{parameter name: numpy array or torch
        tensor}``. ``base_model`` is required unless the store records it; the other
        arguments override the store's attributes. Checked like a pull (shapes, counts,
        names); no magnitude strata (they need θ0). See :mod:`maskhub.ingest.add`.

        ``base``: ``source`` is a sparse patch file (TRL delta sync, vLLM checkpoint patch,
        ``NAME.indices`` + ``NAME.values``) of the checkpoint ``base``, registered as a patch
        (mask + values) that rebuilds the patched weights; ``tol`` defaults to 0 (lossless:
        every entry whose bits change). See :mod:`maskhub.ingest.patch_import`."""
        from maskhub.ingest.patch_import import import_patch, looks_like_patch

        if base is not None:
            patched = import_patch(self, source, str(base), name=name,  # type: ignore[arg-type]
                                   base_model=base_model, target_model=target_model,
                                   base_revision=base_revision,
                                   target_revision=target_revision, tol=tol,
                                   algorithm=algorithm, seed=seed, dataset=dataset, tags=tags,
                                   notes=notes, progress=progress, warn=warn)
            assert isinstance(patched, Mask)
            return patched
        if looks_like_patch(source):
            raise UsageError(f"{source} is a sparse patch (indices + values): importing it "
                             "needs --base BASE, the checkpoint it patches")
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

    def combine(self, operation: str, refs: Sequence[str] = (), *, name: str | None = None,
                min_count: int | None = None, notes: str | None = None,
                progress: ProgressFn | None = None, like: str | None = None,
                per: str = "tensor", seed: int | None = None, base: str | None = None
                ) -> Mask:
        """Register ``intersect``/``union``/``difference``/``consensus`` of masks as a new
        mask with its lineage (see :mod:`maskhub.analytics.combine`), or ``random``: a mask
        with ``like``'s count per tensor (``per="tensor"``) or per tensor and exponent of
        |θ0| (``per="magnitude"``, reading the ``base`` checkpoint, default the recorded
        one) at random positions, seeded by ``seed`` (default 0; see
        :mod:`maskhub.analytics.random_mask`)."""
        from maskhub.analytics.combine import combine

        if operation == "random" or like is not None:
            if operation != "random":
                raise UsageError("--like applies to combine random only")
            if refs:
                raise UsageError("combine random takes no MASKS: name the mask with --like")
            if like is None:
                raise UsageError("combine random needs --like MASK")
            from maskhub.analytics.random_mask import random_like

            mask = random_like(self, self.get(like), per=per,
                               seed=0 if seed is None else seed, base=base, name=name,
                               notes=notes, progress=progress)
            assert isinstance(mask, Mask)
            return mask
        if seed is not None or base is not None or per != "tensor":
            raise UsageError("--seed, --per and --base apply to combine random only")
        masks = [self.get(r) for r in refs]
        mask = combine(self, operation, masks, name=name, min_count=min_count, notes=notes,
                       progress=progress)
        assert isinstance(mask, Mask)
        return mask

    def plot(self, refs: Sequence[str], output: str | os.PathLike[str], *,
             kind: str | None = None, base_model: str | None = None,
             baseline: str = "magnitude", size: tuple[int, int] | None = None,
             refresh: bool = False, progress: ProgressFn | None = None) -> Path:
        """Draw a figure into ``output`` and return its path. ``kind="sparsity"``: the layer x
        module heatmap of one mask; ``kind="overlap"``: the overlap matrix of several masks
        with a random baseline; ``kind="exponents"``: one mask's update rate per exponent of
        |θ0| with its precision null. Default: sparsity for one mask, overlap otherwise."""
        from maskhub.analytics.plot import plot_exponents, plot_overlap, plot_sparsity

        kind = kind or ("sparsity" if len(refs) == 1 and base_model is None else "overlap")
        if kind == "exponents":
            if len(refs) != 1:
                raise UsageError("an exponents plot shows exactly one mask")
            return plot_exponents(self, self.get(refs[0]), output, size)
        if kind == "sparsity":
            if len(refs) != 1:
                raise UsageError("a sparsity plot shows exactly one mask")
            return plot_sparsity(self, self.get(refs[0]), output, size)
        if kind != "overlap":
            raise UsageError(f"unknown plot kind {kind!r}; choose sparsity, overlap or exponents")
        matrix = self.overlap_all(refs, base_model=base_model, refresh=refresh,
                                  progress=progress)
        return plot_overlap(matrix, output, baseline, size)

    def trajectory(self, checkpoints: Sequence[str], *, name: str | None = None,
                   tol: float = 1e-5, device: str = "auto", algorithm: str | None = None,
                   seed: int | None = None, dataset: str | None = None,
                   tags: Sequence[str] = (), patches: bool = False,
                   progress: ProgressFn | None = None) -> TrajectoryResult:
        """Measure a sequence of checkpoints (or one directory of them, ordered by step):
        sparsity against the first and between consecutive ones, the ever-updated set (updated
        against the first at some checkpoint), the Figure 6 share and the never / cancelled /
        subnetwork split; registers ``NAME-final`` and ``NAME-ever`` with the run's
        ``algorithm``, ``seed``, ``dataset`` and ``tags``.

        ``patches=True``: ``checkpoints`` is ``[BASE, P1, ..., Pn]``, a base and an ordered
        chain of sparse patch files (:mod:`maskhub.checkpoints.patches`), measured the same
        way without building any dense checkpoint (:mod:`maskhub.analytics.patch_trajectory`;
        CPU)."""
        if patches:
            from maskhub.analytics.patch_trajectory import run_patch_trajectory

            specs = [str(c) for c in checkpoints]
            if len(specs) < 2:
                raise UsageError("--patches needs a base and at least one patch")
            return run_patch_trajectory(self, specs[0], specs[1:], name=name, tol=tol,
                                        algorithm=algorithm, seed=seed, dataset=dataset,
                                        tags=tags, progress=progress)
        from maskhub.analytics.trajectory import run_trajectory
        from maskhub.kernels.device import resolve_stream_device

        return run_trajectory(self, checkpoints, name=name, tol=tol,
                              device=resolve_stream_device(device), algorithm=algorithm, seed=seed,
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
        from maskhub.kernels.device import resolve_stream_device

        source = self.get(mask) if isinstance(mask, str) else mask
        return compare(a, b, mask=source, tols=tols, device=resolve_stream_device(device),
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

    def recorder(self, model: torch.nn.Module, run: str, **options: Any) -> Recorder:
        """A :class:`~maskhub.training.recorder.Recorder` of ``model``'s run ``run`` into
        this registry: θ0 is kept now; each ``record(step)`` registers ``RUN-step-N`` and
        ``finish()`` registers ``RUN-ever`` and the trajectory rows. ``options``: ``tol``,
        ``keep`` (``"cpu"``/``"disk"``), ``base``, ``per_step``, ``delta_masks``, ``step``,
        name mapping and the run's metadata (see the class)."""
        from maskhub.training.recorder import Recorder

        return Recorder(model, run, home=self, **options)

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
        from maskhub.kernels.device import resolve_stream_device
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
        return verify_mask(source, base, trained, tol=tol, device=resolve_stream_device(device),
                           allow_missing=allow_missing, progress=progress, warn=warn)
