"""The Python API: :class:`Registry` (a maskhub home) and :class:`Mask` (a registered mask).

The CLI is a thin layer over these methods; each command calls the method of the same name.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from maskhub.config import home_dir, store_url
from maskhub.errors import (
    HomeError,
    MaskNotFoundError,
    NameTakenError,
    ReadOnlyRegistryError,
    UsageError,
)
from maskhub.registry import remote
from maskhub.registry.analysis import TensorAnalysis, analyze_checkpoints
from maskhub.registry.diff import ProgressFn, match_tensors, resolve_device, run_diff
from maskhub.registry.index import Index
from maskhub.registry.interrupts import check_interrupt, critical_section, safe_interrupts
from maskhub.registry.kernel import DiffKernel
from maskhub.registry.remote import is_url
from maskhub.registry.sources import open_checkpoint
from maskhub.registry.store import MaskStore, MaskWriter, publish, remove_tree
from maskhub.schemas.metadata import MaskMetadata, TensorStats
from maskhub.schemas.names import invalid_mask_name_message, mask_name_from, valid_mask_name

if TYPE_CHECKING:
    from maskhub.registry.hub import PullResult, PushResult
    from maskhub.registry.overlap import OverlapMatrix, OverlapResult
    from maskhub.registry.trajectory import TrajectoryResult
    from maskhub.registry.verify import VerifyReport

PARTIAL_SUFFIX = ".partial"


class Mask:
    """A registered mask: its metadata, per-tensor stats and bits."""

    def __init__(self, registry: Registry, row: dict[str, Any]) -> None:
        """Built by :meth:`Registry.get`; ``row`` is the mask's row of the ``masks`` table."""
        self.registry = registry
        self.row = row
        self.id: str = row["id"]
        self.name: str = row["name"]
        #: The store: a directory under the home, or a URL (``s3://...``) for a remote store.
        self.path: Path | str = row.get("store_url") or registry.store_path(self.id)
        self._store: MaskStore | None = None

    @property
    def store(self) -> MaskStore:
        """The Zarr store, opened on first use."""
        if self._store is None:
            self._store = MaskStore(self.path)
        return self._store

    @property
    def metadata(self) -> MaskMetadata:
        """Metadata as stored with the bits (hub fields come from the index)."""
        return self.store.metadata

    @property
    def n_params(self) -> int:
        """Parameters covered by the mask."""
        return int(self.row["n_params"])

    @property
    def n_updated(self) -> int:
        """Parameters marked updated."""
        return int(self.row["n_updated"])

    @property
    def sparsity(self) -> float:
        """1 - density."""
        return float(self.row["sparsity"])

    @property
    def density(self) -> float:
        """Fraction of parameters updated."""
        return self.n_updated / self.n_params if self.n_params else 0.0

    def tensor_names(self) -> list[str]:
        """Tensor names in checkpoint order."""
        return list(self.store.names)

    def tensor_stats(self) -> list[TensorStats]:
        """Per-tensor stats in checkpoint order."""
        return list(self.store.iter_stats())

    def __getitem__(self, tensor: str) -> np.ndarray:
        """Boolean mask of one tensor, shaped like the parameter."""
        if tensor not in self.store.names:
            raise KeyError(tensor)
        return self.store.unpacked(tensor)

    def packed(self, tensor: str) -> np.ndarray:
        """Packed bits of one tensor (uint8, little bit order)."""
        return self.store.packed(tensor)

    def to_torch(self, tensor: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Boolean mask of one tensor as a torch tensor."""
        return torch.from_numpy(self[tensor]).to(device)

    # -- Hugging Face Hub (maskhub.registry.hub) ------------------------------------------

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

    def __repr__(self) -> str:
        return (f"Mask(name={self.name!r}, id={self.id[:12]!r}, "
                f"sparsity={self.sparsity:.2%}, n_params={self.n_params})")


class Registry:
    """A maskhub home: the mask stores and the SQL index ``registry.duckdb``."""

    def __init__(self, home: str | os.PathLike[str] | None = None,
                 store: str | None = None) -> None:
        """Open (creating if needed) the registry at ``home`` (default: :func:`home_dir`).

        ``store``: a URL (``s3://bucket/prefix``) under which new masks are written instead of
        ``<home>/masks`` (default: ``$MASKHUB_STORE``, or ``home``/``$MASKHUB_HOME`` when that
        is a URL, the index then staying in the default local home); see
        :mod:`maskhub.registry.remote`. The index is always local.
        """
        self.store_url = store_url(store, home)
        if self.store_url is not None and not is_url(self.store_url):
            raise UsageError(f"a mask store must be a URL such as s3://bucket/prefix, not "
                             f"{self.store_url!r} (for a local directory use --home)")
        self.home = home_dir(home)
        _make_home(self.home)
        self.index = Index(self.home / "registry.duckdb")
        self.index.migrate()  # on a read-only home: only if the index is already up to date
        if self.index.writable:
            self._clean_stale_partials()

    # -- paths ---------------------------------------------------------------------------

    def store_path(self, mask_id: str) -> Path:
        """Where the store of a registered mask lives."""
        return self.home / "masks" / f"{mask_id}.zarr"

    def check_writable(self) -> None:
        """Raise :class:`ReadOnlyRegistryError` unless this process can write the registry."""
        if not self.index.writable:
            read_only_fs = bool(os.statvfs(self.home).f_flag & os.ST_RDONLY)
            raise ReadOnlyRegistryError(
                self.home, "read-only file system" if read_only_fs else "permission denied")

    def staging_path(self, mask_id: str) -> Path:
        """Where a store is written before it is complete (``ReadOnlyRegistryError`` when this
        process cannot write the home: every local write starts here)."""
        self.check_writable()
        return self.home / "tmp" / f"{mask_id}.{os.getpid()}{PARTIAL_SUFFIX}"

    def new_store_location(self, mask_id: str) -> Path | str:
        """Where a new diff writes its store: the local staging directory, or, with a remote
        store root, the final URL (registered by its index row, see :meth:`register_store`),
        after checking that the store root can be reached."""
        if self.store_url is not None:
            remote.check_writable(self.store_url)
            return remote.join(self.store_url, "masks", f"{mask_id}.zarr")
        path = self.staging_path(mask_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _clean_stale_partials(self) -> None:
        """Remove stores left half-written by processes that died (crash, kill -9)."""
        tmp = self.home / "tmp"
        if not tmp.is_dir():
            return
        for entry in tmp.iterdir():
            parts = entry.name.split(".")
            if len(parts) == 3 and entry.name.endswith(PARTIAL_SUFFIX) and parts[1].isdigit():
                if not _pid_alive(int(parts[1])):
                    try:
                        remove_tree(entry)
                    except OSError:  # not ours to remove (another user's): leave it
                        pass

    # -- lookup --------------------------------------------------------------------------

    def get(self, ref: str) -> Mask:
        """The mask named ``ref``, or whose id starts with ``ref``."""
        row = self.index.find(ref)
        if row is None:
            raise MaskNotFoundError(ref)
        return Mask(self, row)

    def ls(self, where: str | None = None) -> list[dict[str, Any]]:
        """Rows of the ``masks`` table, newest first (``where``: an optional SQL filter)."""
        sql = "SELECT * FROM masks"
        if where:  # user-written: one read-only statement, errors as one line (UsageError)
            sql += f" WHERE {where}\n"
        return self.index.user_rows(sql + " ORDER BY created_at DESC, name")

    def sql(self, query: str) -> tuple[list[str], list[tuple]]:
        """Run a read-only SQL query over the index; return ``(columns, rows)``."""
        return self.index.query(query)

    def show(self, ref: str) -> dict[str, Any]:
        """Summary of one mask: its row, per-layer and per-module tables, the sweep, and the
        ``--rank/--stats`` summary (``analysis``: mean rank fraction over the 2-D updates as in
        the paper's Table 2, sign flips, |Δ|; ``None`` when neither was recorded)."""
        mask = self.get(ref)
        with self.index.connect(write=False) as con:
            by_layer = self.index.rows(con, """
                SELECT layer, sum(numel) AS numel, sum(n_updated) AS n_updated,
                       1 - sum(n_updated) / sum(numel) AS sparsity
                FROM tensors WHERE mask_id = ? AND layer IS NOT NULL
                GROUP BY layer ORDER BY layer""", [mask.id])
            by_module = self.index.rows(con, """
                SELECT module, count(*) AS tensors, sum(numel) AS numel,
                       sum(n_updated) AS n_updated, 1 - sum(n_updated) / sum(numel) AS sparsity
                FROM tensors WHERE mask_id = ?
                GROUP BY module ORDER BY min(coalesce(layer, -1)), module""", [mask.id])
            sweep = self.index.rows(con, """
                SELECT tol, sum(n_updated) AS n_updated,
                       1 - sum(n_updated) / (SELECT n_params FROM masks WHERE id = ?) AS sparsity
                FROM tensor_sweep WHERE mask_id = ? GROUP BY tol ORDER BY tol""",
                [mask.id, mask.id])
            analysis = self.index.rows(con, """
                SELECT count(rank) AS n_rank_tensors, avg(rank_fraction) AS mean_rank_fraction,
                       min(rank_fraction) AS min_rank_fraction,
                       count(sign_flips) AS n_stats_tensors, sum(sign_flips) AS sign_flips,
                       sum(a.mean_abs_delta * t.numel) / sum(t.numel)
                           FILTER (WHERE a.mean_abs_delta IS NOT NULL) AS mean_abs_delta,
                       max(max_abs_delta) AS max_abs_delta,
                       sum(n_sub_bf16_step) AS n_sub_bf16_step
                FROM tensor_analysis a JOIN tensors t USING (mask_id, tensor)
                WHERE mask_id = ?""", [mask.id])
        summary = analysis[0] if analysis and (analysis[0]["n_rank_tensors"]
                                               or analysis[0]["n_stats_tensors"]) else None
        return {"mask": _jsonable(mask.row), "by_layer": by_layer, "by_module": by_module,
                "sweep": sweep, "analysis": summary}

    # -- writing -------------------------------------------------------------------------

    def check_new_name(self, name: str) -> None:
        """Raise unless ``name`` is a valid mask name (see :func:`valid_mask_name`) that no
        registered mask has."""
        if not valid_mask_name(name):
            raise UsageError(invalid_mask_name_message(name))
        with self.index.connect(write=False) as con:
            if con.execute("SELECT 1 FROM masks WHERE name = ?", [name]).fetchone():
                raise NameTakenError(name)

    def _default_name(self, target_model: str) -> str:
        return self.free_name(mask_name_from(Path(target_model.rstrip("/")).name))

    def free_name(self, stem: str) -> str:
        """``stem`` if no mask has that name, else the first free ``stem-2``, ``stem-3``..."""
        with self.index.connect(write=False) as con:
            taken = {r[0] for r in con.execute(
                "SELECT name FROM masks WHERE name = ? OR starts_with(name, ?)",
                [stem, stem + "-"]).fetchall()}
        if stem not in taken:
            return stem
        i = 2
        while f"{stem}-{i}" in taken:
            i += 1
        return f"{stem}-{i}"

    def register_store(self, tmp: Path | str, meta: MaskMetadata,
                       tensors: Sequence[TensorStats],
                       sweep: Sequence[tuple[str, float, int]] = (),
                       analysis: Sequence[TensorAnalysis] = ()) -> Mask:
        """Move a completed store from staging into place and index it, atomically.

        ``analysis``: optional ``tensor_analysis`` rows (``diff --rank/--stats``).
        A remote store (``tmp`` a URL) stays where it was written; its index row, committed
        last, is what makes it visible. On any failure the store is removed and nothing is
        registered.
        """
        with critical_section():  # a Ctrl-C here would split the row from its store
            return self._register_store(tmp, meta, tensors, sweep, analysis)

    def _register_store(self, tmp: Path | str, meta: MaskMetadata,
                        tensors: Sequence[TensorStats], sweep: Sequence[tuple[str, float, int]],
                        analysis: Sequence[TensorAnalysis]) -> Mask:
        url = str(tmp) if is_url(tmp) else None
        final = self.store_path(meta.id)
        published = False
        try:
            with self.index.connect() as con:
                if con.execute("SELECT 1 FROM masks WHERE name = ?", [meta.name]).fetchone():
                    raise NameTakenError(meta.name)
                Index.insert_mask(con, meta, tensors, sweep)
                Index.insert_analysis(con, meta.id, [a.to_row() for a in analysis])
                if url is not None:
                    con.execute("UPDATE masks SET store_url = ? WHERE id = ?", [url, meta.id])
                else:
                    publish(Path(tmp), final)
                    published = True
        except BaseException:
            remove_tree(tmp)
            if published:
                remove_tree(final)
            raise
        return self.get(meta.id)

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
        computed in a second streaming pass; see :mod:`maskhub.registry.analysis`).
        ``ray``: run the diff as Ray tasks over groups of tensors, each writing its arrays
        straight into the store: a cluster address, or ``"auto"`` for ``ray.init()``
        (``RAY_ADDRESS`` or a local Ray); see :mod:`maskhub.registry.raydiff`. Same bits.
        With a remote store (``Registry(store=...)``) the store is written to that URL.
        """
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise UsageError(f"tolerance must be a finite number >= 0, not {tol!r}")
        if any(not (math.isfinite(t) and t >= 0) for t in sweep):
            raise UsageError("sweep tolerances must be finite numbers >= 0")
        if ray is not None:
            from maskhub.registry.raydiff import driver_device, ray_diff

            dev = driver_device(device)  # "cuda" is checked on the workers' nodes
        else:
            dev = resolve_device(device)
        if name is not None:
            self.check_new_name(name)
        checked = _interruptible(progress)
        with safe_interrupts():  # Ctrl-C acts between tensors, never mid-commit
            base_ck = open_checkpoint(base)
            target_ck = open_checkpoint(target)
            names, skipped = match_tensors(base_ck, target_ck, allow_missing, warn)
            base_name = base_model or _model_name(base_ck.ref, base_ck.revision)
            target_name = target_model or _model_name(target_ck.ref, target_ck.revision)
            name = name or self._default_name(target_name)
            mask_id = uuid.uuid4().hex
            tmp = self.new_store_location(mask_id)
            try:
                writer = MaskWriter(tmp)
                kernel = DiffKernel(tol=tol, sweep=sorted(set(sweep)), device=dev)
                if ray is not None:
                    outcome = ray_diff(ray, base_ck, target_ck, names, writer, tol=tol,
                                       sweep=kernel.sweep, device=device, progress=checked)
                else:
                    outcome = run_diff(base_ck, target_ck, names, kernel, writer, checked)
                analysis = (analyze_checkpoints(base_ck, target_ck, names, rank=rank, stats=stats,
                                                device=str(dev), progress=checked)
                            if rank or stats else [])
                meta = MaskMetadata(
                    id=mask_id, name=name, base_model=base_name, target_model=target_name,
                    base_revision=base_ck.revision, target_revision=target_ck.revision,
                    n_params=outcome.n_params, n_updated=outcome.n_updated, tol=float(tol),
                    algorithm=algorithm, seed=seed, dataset=dataset,
                    dtype=outcome.dtype_summary(), created_at=_now(), tags=tuple(tags),
                    sweep=tuple(kernel.sweep), notes=notes,
                    extra={"skipped_tensors": skipped} if skipped else {},
                )
                writer.finish(meta)
                check_interrupt()  # the last point where Ctrl-C stops the diff
            except BaseException:
                remove_tree(tmp)
                raise
            finally:
                base_ck.close()
                target_ck.close()
            return self.register_store(tmp, meta, outcome.tensors, outcome.sweep, analysis)

    def demo(self, directory: Path | None = None,
             progress_cb: ProgressFn | None = None) -> dict[str, Any]:
        """Make the embedded demo checkpoint pair (see :mod:`maskhub.registry.demo`) and diff it.

        Returns ``{"mask", "base", "target", "losses"}``.
        """
        from maskhub.registry.demo import make_demo_pair

        self.check_writable()  # before training: the demo registers a mask
        directory = directory or self.home / "demo"
        base, target, losses = make_demo_pair(directory)
        mask = self.diff(base, target, name=self._default_name("demo"), algorithm="demo",
                         seed=0, dataset="synthetic-affine", sweep=(0, 1e-8, 1e-7, 1e-6, 1e-5),
                         base_model="maskhub-demo/tiny-llama-sft",
                         target_model="maskhub-demo/tiny-llama-ft", progress=progress_cb)
        return {"mask": mask, "base": base, "target": target, "losses": losses}

    def derived_from(self, ref: str) -> list[str]:
        """Names of the registered masks made from mask ``ref`` (``combine``, trajectory)."""
        mask = self.get(ref)
        with self.index.connect(write=False) as con:
            return [r[0] for r in con.execute(
                "SELECT DISTINCT m.name FROM mask_lineage l JOIN masks m ON m.id = l.mask_id "
                "WHERE l.parent_id = ? ORDER BY 1", [mask.id]).fetchall()]

    def rm(self, ref: str) -> Mask:
        """Unregister a mask and delete its store; returns the removed mask. Masks derived
        from it (:meth:`derived_from`) stay, their lineage still naming its id."""
        mask = self.get(ref)
        self.index.delete_mask(mask.id)
        remove_tree(mask.path)
        return mask

    # -- overlap analytics (maskhub.registry.overlap, combine, plot) ---------------------

    def overlap(self, a: str, b: str, *, refresh: bool = False,
                progress: ProgressFn | None = None) -> OverlapResult:
        """Overlap of mask ``a`` (I1) with mask ``b`` (I2): counts, o1/o2, Jaccard, uniform
        and stratified random baselines, z-score; cached in the ``overlaps`` table."""
        from maskhub.registry.overlap import overlap

        return overlap(self, self.get(a), self.get(b), refresh=refresh, progress=progress)

    def overlap_all(self, refs: Sequence[str] = (), *, base_model: str | None = None,
                    refresh: bool = False, progress: ProgressFn | None = None,
                    ray: str | None = None) -> OverlapMatrix:
        """Every pair among ``refs`` (default: the masks of ``base_model``, or all masks when
        they share one base model), counted in one pass that reads each mask once.
        ``ray``: count as Ray tasks (a cluster address, or ``"auto"``); same counts."""
        from maskhub.registry.overlap import overlap_all, select_masks

        masks = select_masks(self, refs, base_model)
        return overlap_all(self, masks, refresh=refresh, progress=progress, ray=ray)

    def combine(self, operation: str, refs: Sequence[str], *, name: str | None = None,
                min_count: int | None = None, notes: str | None = None,
                progress: ProgressFn | None = None) -> Mask:
        """Register ``intersect``/``union``/``difference``/``consensus`` of masks as a new
        mask with its lineage (see :mod:`maskhub.registry.combine`)."""
        from maskhub.registry.combine import combine

        masks = [self.get(r) for r in refs]
        return combine(self, operation, masks, name=name, min_count=min_count, notes=notes,
                       progress=progress)

    def plot(self, refs: Sequence[str], output: str | os.PathLike[str], *,
             kind: str | None = None, base_model: str | None = None,
             baseline: str = "stratified", size: tuple[int, int] | None = None,
             refresh: bool = False, progress: ProgressFn | None = None) -> Path:
        """Draw a figure into ``output`` and return its path. ``kind="sparsity"``: the layer x
        module heatmap of one mask; ``kind="overlap"``: the overlap matrix of several masks
        with a random baseline. Default: sparsity for one mask, overlap otherwise."""
        from maskhub.registry.plot import plot_overlap, plot_sparsity

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

    # -- Hugging Face Hub (maskhub.registry.hub) ------------------------------------------

    def push(self, ref: str, repo_id: str, *, private: bool = False,
             revision: str | None = None, commit_message: str | None = None,
             repo_type: str = "model", license: str | None = None,
             token: str | None = None) -> PushResult:
        """Upload mask ``ref`` to Hub repo ``repo_id`` in one commit (Zarr store,
        maskhub.json with every file's sha256, tensors.parquet, model card), creating the repo
        and branch ``revision`` if needed; record the repo and commit in the index. An
        unchanged mask makes no new commit. See :mod:`maskhub.registry.hub`."""
        from maskhub.registry.hub import push

        path = self.get(ref).path
        if is_url(path):
            raise UsageError(f"mask {ref!r} is stored at {path}; push publishes local stores "
                             "only (copy it under HOME/masks first)")
        return push(self, ref, repo_id, private=private, revision=revision,
                    commit_message=commit_message, repo_type=repo_type, license=license,
                    token=token)

    def pull(self, repo_id: str, revision: str | None = None, *, name: str | None = None,
             repo_type: str = "model", token: str | None = None) -> PullResult:
        """Download, verify (versions, paths, every sha256, arrays vs metadata) and register
        the mask of Hub repo ``repo_id`` at ``revision``; a no-op for a commit already
        pulled. Works offline for a cached revision. See :mod:`maskhub.registry.hub`."""
        from maskhub.registry.hub import pull

        return pull(self, repo_id, revision, name=name, repo_type=repo_type, token=token)

    def search(self, *, base_model: str | None = None, algorithm: str | None = None,
               repo_type: str = "model", limit: int = 50,
               token: str | None = None) -> list[dict[str, Any]]:
        """Mask repos on the Hub (tag ``maskhub``), filtered by base model and algorithm."""
        from maskhub.registry.hub import search

        return search(base_model=base_model, algorithm=algorithm, repo_type=repo_type,
                      limit=limit, token=token)

    # -- masked training (maskhub.registry.verify; training itself: maskhub.torch) -------

    def verify(self, mask: str | Any, base: str | os.PathLike[str],
               trained: str | os.PathLike[str], *, tol: float = 0.0, device: str = "auto",
               allow_missing: bool = False, progress: ProgressFn | None = None,
               warn: Callable[[str], None] | None = None) -> VerifyReport:
        """Diff ``trained`` against ``base`` and count, per tensor, the entries that changed
        by more than ``tol`` outside ``mask`` (a name, id prefix or :class:`Mask`); the
        report's ``ok`` is False if any did. See :mod:`maskhub.registry.verify`."""
        from maskhub.registry.verify import verify_mask

        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise UsageError(f"tolerance must be a finite number >= 0, not {tol!r}")
        source = self.get(mask) if isinstance(mask, str) else mask
        return verify_mask(source, base, trained, tol=tol, device=resolve_device(device),
                           allow_missing=allow_missing, progress=progress, warn=warn)


    # -- analysis (maskhub.registry.trajectory) --------------------------------------------

    def trajectory(self, checkpoints: Sequence[str], *, name: str | None = None,
                   tol: float = 1e-5, device: str = "auto",
                   progress: ProgressFn | None = None) -> TrajectoryResult:
        """Measure a sequence of checkpoints (or one directory of them, ordered by step):
        sparsity against the first and between consecutive ones, the ever-updated set and the
        never / cancelled / subnetwork split; registers ``NAME-final`` and ``NAME-ever``."""
        from maskhub.registry.trajectory import run_trajectory

        return run_trajectory(self, checkpoints, name=name, tol=tol,
                              device=resolve_device(device), progress=progress)


def _interruptible(progress: ProgressFn | None) -> ProgressFn:
    """``progress`` preceded by :func:`check_interrupt`: a deferred Ctrl-C stops the work
    after the tensor that just finished."""
    def fn(done: int, total: int, bytes_done: int, bytes_total: int, name: str) -> None:
        check_interrupt()
        if progress is not None:
            progress(done, total, bytes_done, bytes_total, name)
    return fn


def _make_home(home: Path) -> None:
    """Create the home directory if needed; :class:`HomeError` when it cannot be."""
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (home, *home.parents) if p.exists() and not p.is_dir()), None)
        reason = (f"{blocker} is a file, not a directory" if blocker is not None
                  else (exc.strerror or str(exc)).lower())
        raise HomeError(home, reason) from None


def _model_name(ref: str, revision: str | None) -> str:
    path = Path(ref).expanduser()
    if path.exists():
        return str(path.resolve())
    return ref


def _now() -> str:
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, datetime):
            v = v.isoformat()
        out[k] = v
    return out
