"""``fsck``: check that the index and the stores agree, and optionally repair what does not.

Checks, under the registry lock (shared for a check, exclusive with ``repair``, so that no
writer is between its rename and its commit while we look):

* the schema migrations are all applied;
* no staging directory (``tmp/*.partial``) or intent record (``tmp/*.intent``) of a dead
  process is left (an interrupted write; a live process's are work in progress);
* every ``masks`` row has its store, and the store the arrays its ``tensors`` rows list;
* every store under ``masks/`` (and, with a remote store root, under ``<root>/masks/``) has
  its row, and no tombstone (``<id>.zarr.removing``) is left;
* the counts of every ``masks`` and ``tensors`` row are what the one validator
  (:mod:`maskhub.checkpoints.validate`) accepts: non-negative, ``n_updated <= numel``,
  ``numel`` the product of the shape, a mask's totals the sums of its tensors';
* files in ``tmp/trash`` (what recovery moved aside, deleted a bounded amount per open) are
  counted, not problems; ``repair`` deletes them all;
* every row of a table that refers to a mask (``mask_id``; ``mask_a``/``mask_b`` of the
  overlap cache) names a registered mask, and every ``trajectory_points`` row a trajectory;
* every local store records the edits ``masks.edits`` does (``extra.edits`` of its
  ``zarr.json``): a ``maskhub edit`` killed between its rename and its commit leaves the
  store ahead (``edit-uncommitted``; repair: the index's metadata back into the store).

Lineage rows whose *parent* was removed, and trajectories whose masks were removed, are
what ``rm`` leaves by design (the derived masks stay): they are counted, not problems.
Reads no array data: presence of each array's ``zarr.json`` only, and imports no zarr.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskhub.checkpoints.validate import count_problem, short
from maskhub.core.intents import INTENT_SUFFIX, PARTIAL_SUFFIX, iter_intents, parse_name, pid_alive
from maskhub.errors import MaskhubError
from maskhub.maintenance.edit import store_edits_check
from maskhub.storage import remote
from maskhub.storage.files import TOMBSTONE_SUFFIX, discard, remove_tree
from maskhub.storage.trash import count_trash, empty_trash

if TYPE_CHECKING:
    import duckdb

    from maskhub.core.home import Home

STORE_SUFFIX = ".zarr"


@dataclass
class Finding:
    """One problem: ``kind`` (a short key), ``subject`` (the path, mask or table it is
    about), a one-line ``message``, and whether ``--repair`` fixed it."""

    kind: str
    subject: str
    message: str
    repaired: bool = False
    fix: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def line(self) -> str:
        """The one-line form: ``kind: message``, prefixed ``repaired`` once fixed."""
        return f"{'repaired ' if self.repaired else ''}{self.kind}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {k: v for k, v in asdict(self).items() if k != "fix"}


@dataclass
class FsckReport:
    """What :func:`fsck` found. ``clean``: no problem is left (none found, or all repaired)."""

    findings: list[Finding]
    counts: dict[str, int]

    @property
    def clean(self) -> bool:
        """True when every finding (if any) was repaired."""
        return all(f.repaired for f in self.findings)

    def summary(self) -> str:
        """One line: what was checked, and what is by design (removed parents)."""
        c = self.counts
        notes = []
        if c.get("lineage_removed_parents"):
            notes.append(f"{c['lineage_removed_parents']} lineage row(s) name a removed parent")
        if c.get("trajectories_removed_masks"):
            notes.append(f"{c['trajectories_removed_masks']} trajectory(ies) name a removed "
                         "mask")
        if c.get("trash"):
            notes.append(f"{c['trash']} file(s) left by interrupted writes in tmp/trash, "
                         "deleted a bounded amount at each open; fsck --repair deletes them "
                         "now")
        if c.get("trash_deleted"):
            notes.append(f"deleted {c['trash_deleted']} file(s) and folder(s) from tmp/trash")
        if c.get("in_progress"):
            notes.append(f"{c['in_progress']} write(s) in progress")
        state = "clean" if not self.findings else "clean after repair"
        return (f"{state}: {c.get('masks', 0)} mask(s), {c.get('stores', 0)} store(s), "
                f"{c.get('arrays', 0)} array(s) checked" + (f" ({'; '.join(notes)})"
                                                             if notes else ""))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"clean": self.clean, "problems": [f.to_dict() for f in self.findings],
                "counts": dict(self.counts), "summary": self.summary() if self.clean else None}


def fsck(home: Home, repair: bool = False) -> FsckReport:
    """Check the registry at ``home`` (see the module docstring); with ``repair``, fix what can
    be fixed: stale staging and tombstones deleted, interrupted writes settled from the index
    (:meth:`Home.settle_intent`), orphan stores deleted, masks whose store is missing or
    incomplete unregistered (their bytes are gone; nothing can be read from them), dangling
    rows deleted, pending migrations applied. Never writes anything without ``repair``."""
    if repair:
        home.check_writable()
    counts: dict[str, int] = {}
    findings: list[Finding] = []
    pending = home.index.pending_migrations()
    if pending:
        f = Finding("migrations", "registry.duckdb",
                    f"schema migration(s) {', '.join(map(str, pending))} not applied",
                    fix=home.index.migrate)
        findings.append(f)
        if not repair:  # an index without them cannot be read as this maskhub reads it
            findings += _staging(home, counts)
            return FsckReport(findings, counts)
        _apply([f])
    if pending is None and not repair and not home.index.path.exists():  # no index, no rows
        findings += _staging(home, counts)
        busy = {i.mask_id for i in iter_intents(home.tmp_dir)}
        findings += _stores(home, {}, busy, counts)
        return FsckReport(findings, counts)
    with home.index.connect(write=repair) as con:
        staging = _staging(home, counts)
        if repair:
            _apply(staging)  # settles interrupted writes before the rest is looked at
        busy = {i.mask_id for i in iter_intents(home.tmp_dir)}
        rows = {r[0]: (r[1], r[2]) for r in con.execute(
            "SELECT id, name, store_url FROM masks").fetchall()}
        later = _rows(home, con, rows, busy, counts)
        later += _counts(con, rows, busy)
        later += _stores(home, rows, busy, counts)
        later += _references(home, con, rows, counts)
        later += [Finding(k, s, m, fix=f) for k, s, m, f in store_edits_check(home, con, busy)]
        if repair:
            _apply(later)
    if repair:
        counts["trash_deleted"] = empty_trash(home.tmp_dir)[0]
    counts["trash"] = count_trash(home.tmp_dir)
    return FsckReport([*findings, *staging, *later], counts)


def _apply(findings: list[Finding]) -> None:
    for f in findings:
        if f.fix is not None and not f.repaired:
            try:
                f.fix()
            except (MaskhubError, OSError):
                continue
            f.repaired = True


def _short(mask_id: str) -> str:
    return mask_id[:12]


def _staging(home: Home, counts: dict[str, int]) -> list[Finding]:
    """Staging directories and intent records of dead processes."""
    out: list[Finding] = []
    counts.setdefault("in_progress", 0)
    if not home.tmp_dir.is_dir():
        return out
    for entry in sorted(home.tmp_dir.iterdir()):
        rel = str(entry.relative_to(home.home))
        partial = (parse_name(entry.name, PARTIAL_SUFFIX)
                   or parse_name(entry.name, INTENT_SUFFIX + ".tmp"))
        if partial is not None:
            if pid_alive(partial[1]):
                counts["in_progress"] += 1
            else:
                out.append(Finding("stale-staging", rel, f"{rel} was left by process "
                                   f"{partial[1]}, which died while writing it",
                                   fix=lambda e=entry: remove_tree(e) if e.is_dir()
                                   else e.unlink(missing_ok=True)))
    for intent in iter_intents(home.tmp_dir):
        if pid_alive(intent.pid):
            counts["in_progress"] += 1
            continue
        what = "removal" if intent.op == "rm" else "registration"
        rel = str(intent.path.relative_to(home.home))
        out.append(Finding("interrupted", rel, f"the {what} of mask {_short(intent.mask_id)} "
                           f"by process {intent.pid} was interrupted ({rel})",
                           fix=lambda i=intent: home.settle_intent(i)))
    return out


def _unregister(home: Home, mask_id: str, store: Path | str | None) -> Callable[[], None]:
    def fix() -> None:
        home.index.delete_mask(mask_id)
        if isinstance(store, Path):
            discard(store)
    return fix


def _rows(home: Home, con: duckdb.DuckDBPyConnection, rows: dict[str, tuple[str, str | None]],
          busy: set[str], counts: dict[str, int]) -> list[Finding]:
    """Every row has its store, with the arrays its ``tensors`` rows list."""
    tensors: dict[str, list[str]] = {}
    for mask_id, tensor in con.execute("SELECT mask_id, tensor FROM tensors ORDER BY 1, 2"
                                       ).fetchall():
        tensors.setdefault(mask_id, []).append(tensor)
    counts["masks"] = len(rows)
    counts["arrays"] = 0
    out: list[Finding] = []
    for mask_id, (name, url) in sorted(rows.items(), key=lambda kv: kv[1][0]):
        if mask_id in busy:
            continue
        names = tensors.get(mask_id, [])
        where = url or f"masks/{mask_id}.zarr"
        subject = f"mask {name} ({_short(mask_id)})"
        if url is not None:
            try:
                keys = set(remote.list_keys(url))
            except (MaskhubError, OSError) as exc:
                out.append(Finding("unreachable-store", subject, f"{subject}: its store {url} "
                                   f"cannot be listed: {str(exc).splitlines()[0]}"))
                continue
            present = "zarr.json" in keys
            missing = [t for t in names if f"{t}/zarr.json" not in keys]
            local: Path | None = None
        else:
            local = home.store_path(mask_id)
            present = (local / "zarr.json").is_file()
            missing = [t for t in names if not (local / t / "zarr.json").is_file()]
        counts["arrays"] += len(names) - len(missing) if present else 0
        if not present and local is not None and home.tombstone_path(mask_id).exists():
            continue  # half-removed: the tombstone finding puts it back
        if not present:
            out.append(Finding("missing-store", subject, f"{subject}: its store {where} is "
                               "missing (repair: unregister it)",
                               fix=_unregister(home, mask_id, local)))
        elif missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            out.append(Finding("incomplete-store", subject,
                               f"{subject}: its store {where} lacks the array "
                               f"{missing[0]!r}{more} (repair: unregister it, delete the store)",
                               fix=_unregister(home, mask_id, local)))
    return out


def _counts(con: duckdb.DuckDBPyConnection, rows: dict[str, tuple[str, str | None]],
            busy: set[str]) -> list[Finding]:
    """The invariants of :mod:`maskhub.checkpoints.validate` on what is indexed: counts
    non-negative, ``n_updated <= numel``, ``numel`` the product of the shape, each mask's
    totals the sums of its tensors'. No repair: the mask's bits cannot be trusted; the
    message says how to remove it."""
    bad: dict[str, str] = {}
    for mask_id, n_params, n_updated in con.execute(
            "SELECT id, n_params, n_updated FROM masks WHERE n_params < 0 OR n_updated < 0 "
            "OR n_updated > n_params").fetchall():
        bad[mask_id] = count_problem(n_params, n_updated) or ""
    for mask_id, tensor, shape, numel, n_updated in con.execute(
            "SELECT mask_id, tensor, shape, numel, n_updated FROM tensors ORDER BY mask_id, "
            "tensor").fetchall():
        problem = count_problem(numel, n_updated, list(shape))
        if problem and mask_id not in bad:
            bad[mask_id] = f"tensor {short(tensor)}: {problem}"
    for mask_id, n_params, n_updated, t_params, t_updated in con.execute(
            "SELECT m.id, m.n_params, m.n_updated, sum(t.numel), sum(t.n_updated) FROM masks m "
            "JOIN tensors t ON t.mask_id = m.id GROUP BY ALL HAVING sum(t.numel) <> m.n_params "
            "OR sum(t.n_updated) <> m.n_updated").fetchall():
        bad.setdefault(mask_id, f"its tensors hold {t_params} entries and {t_updated} updated, "
                                f"the mask row says {n_params} and {n_updated}")
    out = []
    for mask_id, problem in sorted(bad.items(), key=lambda kv: rows.get(kv[0], ("",))[0]):
        if mask_id in busy or mask_id not in rows:
            continue
        name = rows[mask_id][0]
        subject = f"mask {name} ({_short(mask_id)})"
        out.append(Finding("bad-counts", subject, f"{subject}: {problem} (its bits cannot be "
                           f"trusted; remove it: `maskhub rm {name}`)"))
    return out


def _stores(home: Home, rows: dict[str, tuple[str, str | None]], busy: set[str],
            counts: dict[str, int]) -> list[Finding]:
    """Every store has its row; no tombstone is left."""
    out: list[Finding] = []
    masks_dir = home.home / "masks"
    n = 0
    entries = sorted(masks_dir.iterdir()) if masks_dir.is_dir() else []
    for entry in entries:
        rel = f"masks/{entry.name}"
        if entry.name.endswith(STORE_SUFFIX + TOMBSTONE_SUFFIX):
            mask_id = entry.name[: -len(STORE_SUFFIX + TOMBSTONE_SUFFIX)]
            if mask_id in busy:
                continue
            if mask_id in rows and rows[mask_id][1] is None \
                    and not home.store_path(mask_id).exists():
                out.append(Finding("tombstone", rel, f"{rel} is the store of registered mask "
                                   f"{rows[mask_id][0]!r}, left half-removed (repair: put it "
                                   "back)", fix=lambda e=entry, i=mask_id:
                                   e.rename(home.store_path(i))))
            else:
                out.append(Finding("tombstone", rel, f"{rel} is a store left half-deleted "
                                   "(repair: delete it)", fix=lambda e=entry: remove_tree(e)))
        elif entry.name.endswith(STORE_SUFFIX) and entry.is_dir():
            mask_id = entry.name[: -len(STORE_SUFFIX)]
            if mask_id in rows and rows[mask_id][1] is None:
                n += 1
            elif mask_id not in busy:
                out.append(Finding("orphan-store", rel, f"{rel} has no row in masks (a write "
                                   "killed before its commit; repair: delete it)",
                                   fix=lambda e=entry: discard(e)))
    if home.store_url is not None:
        root = remote.join(home.store_url, "masks")
        registered = {remote.join(root, f"{i}{STORE_SUFFIX}") for i, (_, u) in rows.items()
                      if u is not None}
        n += len([u for u in registered if u.startswith(root + "/")])
        try:
            names = remote.list_names(root)
        except (MaskhubError, OSError) as exc:
            names = []
            out.append(Finding("unreachable-store", root, f"the store root {home.store_url} "
                               f"cannot be listed: {str(exc).splitlines()[0]}"))
        for entry_name in names:
            url = remote.join(root, entry_name)
            mask_id = entry_name[: -len(STORE_SUFFIX)]
            if not entry_name.endswith(STORE_SUFFIX) or url in registered or mask_id in busy:
                continue
            out.append(Finding("orphan-store", url, f"{url} has no row in masks (a write "
                               "killed before its commit; repair: delete it)",
                               fix=lambda u=url: remove_tree(u)))
    counts["stores"] = n
    return out


def _references(home: Home, con: duckdb.DuckDBPyConnection,
                rows: dict[str, tuple[str, str | None]], counts: dict[str, int]
                ) -> list[Finding]:
    """Rows that refer to masks (or trajectories) that do not exist."""
    out: list[Finding] = []
    found = con.execute(
        "SELECT c.table_name, c.column_name FROM information_schema.columns c "
        "JOIN information_schema.tables t "
        "ON t.table_schema = c.table_schema AND t.table_name = c.table_name "
        "WHERE t.table_type = 'BASE TABLE' AND c.table_name <> 'masks' "
        "AND c.column_name IN ('mask_id', 'mask_a', 'mask_b') ORDER BY 1, 2").fetchall()
    columns: dict[str, list[str]] = {}
    for table, column in found:
        columns.setdefault(table, []).append(column)
    for table, cols in sorted(columns.items()):
        cond = " OR ".join(f"{c} NOT IN (SELECT id FROM masks)" for c in cols)
        dangling = con.execute(
            f'SELECT count(*), min({cols[0]}) FROM "{table}" WHERE {cond}').fetchone()
        if dangling and dangling[0]:
            kind = "overlap-cache" if "mask_a" in cols else "dangling-rows"
            out.append(Finding(kind, table, f"{dangling[0]} row(s) of {table} name a mask that "
                               f"is not registered (e.g. {dangling[1]}; repair: delete them)",
                               fix=_delete_where(home, table, cond)))
    points = con.execute("SELECT count(*) FROM trajectory_points WHERE trajectory_id NOT IN "
                         "(SELECT id FROM trajectories)").fetchone()[0]
    if points:
        cond = "trajectory_id NOT IN (SELECT id FROM trajectories)"
        out.append(Finding("dangling-rows", "trajectory_points", f"{points} row(s) of "
                           "trajectory_points name a trajectory that does not exist (repair: "
                           "delete them)", fix=_delete_where(home, "trajectory_points", cond)))
    counts["lineage_removed_parents"] = con.execute(
        "SELECT count(*) FROM mask_lineage WHERE parent_id NOT IN (SELECT id FROM masks)"
    ).fetchone()[0]
    counts["trajectories_removed_masks"] = con.execute(
        "SELECT count(*) FROM trajectories WHERE final_mask_id NOT IN (SELECT id FROM masks) "
        "OR ever_mask_id NOT IN (SELECT id FROM masks)").fetchone()[0]
    return out


def _delete_where(home: Home, table: str, cond: str) -> Callable[[], None]:
    def fix() -> None:
        with home.index.connect() as con:
            con.execute(f'DELETE FROM "{table}" WHERE {cond}')
    return fix
