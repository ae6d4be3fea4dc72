"""A maskhub home opened: the SQL index, where stores live, and the commit protocol that
makes a written store a registered mask. Every feature builds on this; nothing here imports
zarr, torch or numba."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from maskhub.config import home_dir, store_url
from maskhub.core.crashpoints import crash_point
from maskhub.core.intents import (
    INTENT_SUFFIX,
    PARTIAL_SUFFIX,
    Intent,
    iter_intents,
    parse_name,
    pid_alive,
    write_intent,
)
from maskhub.core.interrupts import critical_section
from maskhub.core.record import MaskRecord
from maskhub.errors import (
    HomeError,
    MaskhubError,
    MaskNotFoundError,
    NameTakenError,
    ReadOnlyRegistryError,
    UsageError,
)
from maskhub.schemas.analysis import TensorAnalysis
from maskhub.schemas.metadata import MaskMetadata, TensorStats
from maskhub.schemas.names import invalid_mask_name_message, mask_name_from, valid_mask_name
from maskhub.storage import remote
from maskhub.storage.files import discard, publish, remove_tree, tombstone
from maskhub.storage.index import Index
from maskhub.storage.trash import OPEN_FILES, OPEN_SECONDS, empty_trash, to_trash

if TYPE_CHECKING:
    import duckdb

__all__ = ["PARTIAL_SUFFIX", "Home"]


class Home:
    """A maskhub home: the mask stores and the SQL index ``registry.duckdb``.

    :class:`maskhub.Registry` is this plus the features; features take a ``Home`` (and get
    masks of the registry's own class back from :meth:`get`).
    """

    #: What :meth:`get` returns (:class:`maskhub.Mask` for a :class:`maskhub.Registry`).
    record_class: type[MaskRecord] = MaskRecord

    def __init__(self, home: str | os.PathLike[str] | None = None,
                 store: str | None = None, *, recover: bool = True) -> None:
        """Open (creating if needed) the home at ``home`` (default: :func:`home_dir`).

        ``store``: a URL (``s3://bucket/prefix``) under which new masks are written instead of
        ``<home>/masks`` (default: ``$MASKHUB_STORE``, or ``home``/``$MASKHUB_HOME`` when that
        is a URL, the index then staying in the default local home); see
        :mod:`maskhub.storage.remote`. The index is always local, and opened (migrations
        applied) on first use. ``recover``: when the home is writable, first finish what
        crashed processes left (see :meth:`recover`); ``maskhub fsck`` opens without.
        """
        self.store_url = store_url(store, home)
        if self.store_url is not None and not remote.is_url(self.store_url):
            raise UsageError(f"a mask store must be a URL such as s3://bucket/prefix, not "
                             f"{self.store_url!r} (for a local directory use --home)")
        self.home = home_dir(home)
        _make_home(self.home)
        self.index = Index(self.home / "registry.duckdb")
        if recover and self.index.writable:
            self.recover()

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
        after checking that the store root can be reached.

        A remote store is written in place, not staged: its intent record is written first,
        so that a process killed while writing it leaves a prefix that recovery deletes.
        """
        if self.store_url is not None:
            self.check_writable()
            remote.check_writable(self.store_url)
            url = remote.join(self.store_url, "masks", f"{mask_id}.zarr")
            write_intent(self.tmp_dir, mask_id, "add", url)
            return url
        path = self.staging_path(mask_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def tmp_dir(self) -> Path:
        """Where stores are staged and intent records kept (``<home>/tmp``)."""
        return self.home / "tmp"

    def tombstone_path(self, mask_id: str) -> Path:
        """Where the local store of ``mask_id`` is moved while it is being deleted."""
        return tombstone(self.store_path(mask_id))

    # -- recovery ------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Finish what processes killed mid-write left: move their staging directories into
        the trash and settle their intent records (:meth:`settle_intent`), then delete a
        bounded part of the trash (:func:`~maskhub.storage.trash.empty_trash`: at most
        ``OPEN_FILES`` files or ``OPEN_SECONDS`` seconds; the rest at later opens or by
        ``fsck --repair``). Returns one line per thing done.

        The registry's state is settled at once whatever the size of what a crash left (one
        rename per staging directory or orphan store); only the deletion of their files is
        spread over opens. Costs one listing of ``tmp/`` when nothing crashed; an index
        connection (under the exclusive lock) only when an intent record of a dead process is
        found. A record that cannot be settled now (an unreachable remote store) stays for a
        later open.
        """
        done = self._clean_stale_partials()
        stale = [i for i in iter_intents(self.tmp_dir) if not pid_alive(i.pid)]
        if stale:
            with self.index.connect():
                for intent in stale:
                    try:
                        done.append(self.settle_intent(intent))
                    except (MaskhubError, OSError):
                        continue
        deleted, _ = empty_trash(self.tmp_dir, OPEN_FILES, OPEN_SECONDS)
        if deleted:
            done.append(f"deleted {deleted} file(s) and folder(s) from tmp/trash")
        return done

    def _clean_stale_partials(self) -> list[str]:
        """Remove stores (and unfinished intent records) left half-written by processes that
        died (crash, kill -9); return one line per removal."""
        done: list[str] = []
        if not self.tmp_dir.is_dir():
            return done
        for entry in self.tmp_dir.iterdir():
            parsed = (parse_name(entry.name, PARTIAL_SUFFIX)
                      or parse_name(entry.name, INTENT_SUFFIX + ".tmp"))
            if parsed is None or pid_alive(parsed[1]):
                continue
            try:
                if entry.is_dir():  # one rename, however many files: deleted from the trash
                    if not to_trash(self.tmp_dir, entry):
                        continue
                else:
                    entry.unlink(missing_ok=True)
            except OSError:  # not ours to remove (another user's): leave it
                continue
            done.append(f"removed {entry.relative_to(self.home)}, left by process "
                        f"{parsed[1]}, which died")
        return done

    def settle_intent(self, intent: Intent) -> str:
        """Settle the intent record of a process that died, from the index: with the mask's
        row committed, its store is the mask's (a tombstoned one, left by an ``rm`` killed
        before its commit, is renamed back); without it, the store is an orphan and deleted.
        Then the record goes. Returns what was done, in one line.

        Runs under the exclusive lock: stores enter and leave ``masks/`` only while a writer
        holds it, so no live writer can be between its rename and its commit now.
        """
        mask_id = intent.mask_id
        final, grave = self.store_path(mask_id), self.tombstone_path(mask_id)
        with self.index.connect() as con:
            row = con.execute("SELECT store_url FROM masks WHERE id = ?", [mask_id]).fetchone()
            if row is None:
                if intent.store_url is not None:
                    remove_tree(intent.store_url)
                to_trash(self.tmp_dir, final)  # renames only: the files go with the trash
                to_trash(self.tmp_dir, grave)
                what = f"deleted the store of {mask_id}, never registered or already removed"
            else:
                if row[0] is None and not final.exists() and grave.exists():
                    os.replace(grave, final)
                else:
                    to_trash(self.tmp_dir, grave)
                what = f"kept mask {mask_id}: its registration was committed"
            intent.path.unlink(missing_ok=True)
        verb = "an interrupted rm" if intent.op == "rm" else "an interrupted registration"
        return f"{verb} by process {intent.pid}: {what}"

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
                       strata: Sequence[tuple[str, int, int, int]] = (),
                       extra: Callable[[duckdb.DuckDBPyConnection], None] | None = None
                       ) -> MaskRecord:
        """Move a completed store from staging into place and index it, atomically.

        ``analysis``: optional ``tensor_analysis`` rows (``diff --rank/--stats``);
        ``strata``: ``tensor_strata`` rows ``(tensor, stratum, numel, n_updated)``.
        ``extra``: called with the connection inside the same transaction, for rows that must
        commit with the mask's or not at all (lineage, trajectories).
        A remote store (``tmp`` a URL) stays where it was written; its index row, committed
        last, is what makes it visible. On any failure the store is removed and nothing is
        registered. Inside an open ``index.connect()`` block the registration joins that
        transaction, and is settled (kept, or its store removed) by its end; an exception
        raised here must then abort that transaction.

        The protocol, all under the exclusive lock: insert the rows; write the intent record
        ``tmp/<id>.<pid>.intent``; rename the store into ``masks/``; commit; delete the
        record. Killed anywhere, the next writable open settles the record from the index
        (:meth:`recover`): the whole mask, or nothing.
        """
        with critical_section():  # a Ctrl-C here would split the row from its store
            return self._register_store(tmp, meta, tensors, sweep, analysis, strata, extra)

    def _register_store(self, tmp: Path | str, meta: MaskMetadata,
                        tensors: Sequence[TensorStats], sweep: Sequence[tuple[str, float, int]],
                        analysis: Sequence[TensorAnalysis],
                        strata: Sequence[tuple[str, int, int, int]],
                        extra: Callable[[duckdb.DuckDBPyConnection], None] | None
                        ) -> MaskRecord:
        url = str(tmp) if remote.is_url(tmp) else None
        final = self.store_path(meta.id)
        crash_point("register:staged")
        published: list[Path] = []
        intent: list[Path] = []

        def settle(committed: bool | None) -> None:
            if committed is None:
                return  # the commit failed: its outcome is for recovery to read in the index
            if committed:
                crash_point("register:committed")
            else:
                remove_tree(tmp)
                for path in published:
                    discard(path)
            for path in intent:
                path.unlink(missing_ok=True)

        try:
            with self.index.connect() as con:
                self.index.on_exit(settle)
                if con.execute("SELECT 1 FROM masks WHERE name = ?", [meta.name]).fetchone():
                    raise NameTakenError(meta.name)
                Index.insert_mask(con, meta, tensors, sweep)
                Index.insert_precision_null(con, meta, tensors)
                Index.insert_analysis(con, meta.id, [a.to_row() for a in analysis])
                Index.insert_strata(con, meta.id, strata)
                intent.append(write_intent(self.tmp_dir, meta.id, "add", url))
                crash_point("register:intent-written")
                if url is not None:
                    con.execute("UPDATE masks SET store_url = ? WHERE id = ?", [url, meta.id])
                else:
                    # A store already there is an orphan: its id had no row (the insert above
                    # succeeded) and no other writer can be mid-commit (we hold the lock).
                    discard(final)
                    publish(Path(tmp), final)
                    published.append(final)
                    crash_point("register:published")
                if extra is not None:
                    extra(con)
                mask = self.get(meta.id)  # the same connection: read before the commit
        except BaseException:
            remove_tree(tmp)  # also when the connection itself failed, before settle was set
            raise
        return mask

    def remove(self, mask: MaskRecord) -> None:
        """Unregister ``mask`` and delete its store.

        Under the exclusive lock: write the intent record, delete the rows, rename a local
        store to its tombstone ``masks/<id>.zarr.removing``, commit; then delete the
        tombstone (or the remote prefix) and the record. Killed before the commit, recovery
        renames the tombstone back; after it, recovery finishes the deletion.
        """
        with critical_section():
            self._remove(mask)

    def _remove(self, mask: MaskRecord) -> None:
        url = str(mask.path) if remote.is_url(mask.path) else None
        final, grave = self.store_path(mask.id), self.tombstone_path(mask.id)
        intent: list[Path] = []
        moved: list[Path] = []

        def settle(committed: bool | None) -> None:
            if committed is False:
                for path in moved:
                    os.replace(grave, path)
                for path in intent:
                    path.unlink(missing_ok=True)
            elif committed:
                crash_point("rm:committed")

        with self.index.connect():
            self.index.on_exit(settle)
            intent.append(write_intent(self.tmp_dir, mask.id, "rm", url))
            self.index.delete_mask(mask.id)
            crash_point("rm:intent-written")
            if url is None and final.exists():
                remove_tree(grave)
                os.replace(final, grave)
                moved.append(final)
                crash_point("rm:tombstoned")
        if url is not None:
            remove_tree(url)
        else:
            (grave / "zarr.json").unlink(missing_ok=True)  # no longer a readable store
            crash_point("rm:half-deleted")
            remove_tree(grave)
        for path in intent:
            path.unlink(missing_ok=True)


def _make_home(home: Path) -> None:
    """Create the home directory if needed; :class:`HomeError` when it cannot be."""
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (home, *home.parents) if p.exists() and not p.is_dir()), None)
        reason = (f"{blocker} is a file, not a directory" if blocker is not None
                  else (exc.strerror or str(exc)).lower())
        raise HomeError(home, reason) from None

