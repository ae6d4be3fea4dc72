"""A maskhub home opened: the SQL index, where stores live, and the commit protocol that
makes a written store a registered mask. Every feature builds on this; nothing here imports
zarr, torch or numba."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from maskhub.config import home_dir, store_url
from maskhub.core.interrupts import critical_section
from maskhub.core.record import MaskRecord
from maskhub.errors import (
    HomeError,
    MaskNotFoundError,
    NameTakenError,
    ReadOnlyRegistryError,
    UsageError,
)
from maskhub.schemas.analysis import TensorAnalysis
from maskhub.schemas.metadata import MaskMetadata, TensorStats
from maskhub.schemas.names import invalid_mask_name_message, mask_name_from, valid_mask_name
from maskhub.storage import remote
from maskhub.storage.files import publish, remove_tree
from maskhub.storage.index import Index

PARTIAL_SUFFIX = ".partial"


class Home:
    """A maskhub home: the mask stores and the SQL index ``registry.duckdb``.

    :class:`maskhub.Registry` is this plus the features; features take a ``Home`` (and get
    masks of the registry's own class back from :meth:`get`).
    """

    #: What :meth:`get` returns (:class:`maskhub.Mask` for a :class:`maskhub.Registry`).
    record_class: type[MaskRecord] = MaskRecord

    def __init__(self, home: str | os.PathLike[str] | None = None,
                 store: str | None = None) -> None:
        """Open (creating if needed) the home at ``home`` (default: :func:`home_dir`).

        ``store``: a URL (``s3://bucket/prefix``) under which new masks are written instead of
        ``<home>/masks`` (default: ``$MASKHUB_STORE``, or ``home``/``$MASKHUB_HOME`` when that
        is a URL, the index then staying in the default local home); see
        :mod:`maskhub.storage.remote`. The index is always local, and opened (migrations
        applied) on first use.
        """
        self.store_url = store_url(store, home)
        if self.store_url is not None and not remote.is_url(self.store_url):
            raise UsageError(f"a mask store must be a URL such as s3://bucket/prefix, not "
                             f"{self.store_url!r} (for a local directory use --home)")
        self.home = home_dir(home)
        _make_home(self.home)
        self.index = Index(self.home / "registry.duckdb")
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
        """Where a new mask writes its store: the local staging directory, or, with a remote
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

    def get(self, ref: str) -> MaskRecord:
        """The mask named ``ref``, or whose id starts with ``ref``."""
        row = self.index.find(ref)
        if row is None:
            raise MaskNotFoundError(ref)
        return self.record_class(self, row, row.get("store_url") or self.store_path(row["id"]))

    def derived_from(self, ref: str) -> list[str]:
        """Names of the registered masks made from mask ``ref`` (``combine``, trajectory)."""
        with self.index.connect(write=False) as con:
            mask = self.get(ref)
            return [r[0] for r in con.execute(
                "SELECT DISTINCT m.name FROM mask_lineage l JOIN masks m ON m.id = l.mask_id "
                "WHERE l.parent_id = ? ORDER BY 1", [mask.id]).fetchall()]

    # -- names ---------------------------------------------------------------------------

    def check_new_name(self, name: str) -> None:
        """Raise unless ``name`` is a valid mask name (see :func:`valid_mask_name`) that no
        registered mask has."""
        if not valid_mask_name(name):
            raise UsageError(invalid_mask_name_message(name))
        with self.index.connect(write=False) as con:
            if con.execute("SELECT 1 FROM masks WHERE name = ?", [name]).fetchone():
                raise NameTakenError(name)

    def default_name(self, target_model: str) -> str:
        """A free mask name made from the target model's name."""
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

    # -- the commit protocol -------------------------------------------------------------

    def register_store(self, tmp: Path | str, meta: MaskMetadata,
                       tensors: Sequence[TensorStats],
                       sweep: Sequence[tuple[str, float, int]] = (),
                       analysis: Sequence[TensorAnalysis] = (),
                       strata: Sequence[tuple[str, int, int, int]] = ()) -> MaskRecord:
        """Move a completed store from staging into place and index it, atomically.

        ``analysis``: optional ``tensor_analysis`` rows (``diff --rank/--stats``);
        ``strata``: ``tensor_strata`` rows ``(tensor, stratum, numel, n_updated)``.
        A remote store (``tmp`` a URL) stays where it was written; its index row, committed
        last, is what makes it visible. On any failure the store is removed and nothing is
        registered.
        """
        with critical_section():  # a Ctrl-C here would split the row from its store
            return self._register_store(tmp, meta, tensors, sweep, analysis, strata)

    def _register_store(self, tmp: Path | str, meta: MaskMetadata,
                        tensors: Sequence[TensorStats], sweep: Sequence[tuple[str, float, int]],
                        analysis: Sequence[TensorAnalysis],
                        strata: Sequence[tuple[str, int, int, int]]) -> MaskRecord:
        url = str(tmp) if remote.is_url(tmp) else None
        final = self.store_path(meta.id)
        published = False
        try:
            with self.index.connect() as con:
                if con.execute("SELECT 1 FROM masks WHERE name = ?", [meta.name]).fetchone():
                    raise NameTakenError(meta.name)
                Index.insert_mask(con, meta, tensors, sweep)
                Index.insert_analysis(con, meta.id, [a.to_row() for a in analysis])
                Index.insert_strata(con, meta.id, strata)
                if url is not None:
                    con.execute("UPDATE masks SET store_url = ? WHERE id = ?", [url, meta.id])
                else:
                    publish(Path(tmp), final)
                    published = True
                mask = self.get(meta.id)  # the same connection: read before the commit
        except BaseException:
            remove_tree(tmp)
            if published:
                remove_tree(final)
            raise
        return mask

    def remove(self, mask: MaskRecord) -> None:
        """Unregister ``mask`` and delete its store."""
        self.index.delete_mask(mask.id)
        remove_tree(mask.path)


def _make_home(home: Path) -> None:
    """Create the home directory if needed; :class:`HomeError` when it cannot be."""
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (home, *home.parents) if p.exists() and not p.is_dir()), None)
        reason = (f"{blocker} is a file, not a directory" if blocker is not None
                  else (exc.strerror or str(exc)).lower())
        raise HomeError(home, reason) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
