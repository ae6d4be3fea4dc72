"""``maskhub edit``: correct a registered mask's metadata after the fact, recorded.

The index row and the store's group attributes change together, under the index's
exclusive lock: the row is updated, the store's attributes are replaced (a local
``zarr.json`` by an atomic rename), then the transaction commits; if it does not commit, the
old attributes are put back. A process killed between the rename and the commit leaves the
store ahead of the index: :func:`store_edits_check` (run by ``fsck``) finds it, and its
repair puts the index's metadata back in the store. Each edit is recorded:
``masks.edited_at`` and one line per changed field appended to ``masks.edits``
(``"<when> base_model: 'old' -> 'new'"``), mirrored in the store's ``extra.edits``. The
bits, counts and fingerprints are never edited: they are what the diff measured.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskhub.core.crashpoints import crash_point
from maskhub.core.home import Home
from maskhub.core.provenance import timestamp
from maskhub.core.record import MaskRecord
from maskhub.errors import NameTakenError, UsageError
from maskhub.schemas.names import invalid_mask_name_message, valid_mask_name

if TYPE_CHECKING:
    import duckdb

#: The fields ``edit`` may change (the ``masks`` columns of the same names).
EDITABLE = ("name", "base_model", "base_revision", "target_model", "target_revision",
            "algorithm", "seed", "dataset", "tags", "notes")


def edit(home: Home, mask: MaskRecord, changes: dict[str, Any]) -> MaskRecord:
    """Apply ``changes`` (``{field: new value}``, fields of :data:`EDITABLE`; ``None`` values
    are ignored) to ``mask``; return the mask as now registered. A change to the value a
    field already has is no change; nothing to change is a ``UsageError``."""
    from maskhub.storage.store import replace_attributes

    unknown = sorted(set(changes) - set(EDITABLE))
    if unknown:
        raise UsageError(f"cannot edit {', '.join(unknown)}: editable fields are "
                         + ", ".join(EDITABLE))
    home.check_writable()
    wanted = {k: (tuple(v) if k == "tags" else v) for k, v in changes.items() if v is not None}
    if "name" in wanted and not valid_mask_name(wanted["name"]):
        raise UsageError(invalid_mask_name_message(wanted["name"]))
    if not wanted:
        raise UsageError("nothing to edit: give at least one of --name, --base-model, "
                         "--algorithm, --seed, --dataset, --tag, --notes... (see "
                         "'maskhub edit --help')")
    with home.index.connect() as con:
        row = home.index.rows(con, "SELECT * FROM masks WHERE id = ?", [mask.id])[0]
        now = timestamp()
        diffs: dict[str, Any] = {}
        lines: list[str] = []
        for key, value in wanted.items():
            old = tuple(row[key] or ()) if key == "tags" else row[key]
            if old == value:
                continue
            if key == "name" and con.execute("SELECT 1 FROM masks WHERE name = ?",
                                             [value]).fetchone():
                raise NameTakenError(value)
            diffs[key] = value
            shown = (list(old), list(value)) if key == "tags" else (old, value)
            lines.append(f"{now} {key}: {shown[0]!r} -> {shown[1]!r}")
        if not diffs:
            raise UsageError(f"nothing to edit: mask {mask.name!r} already has these values")
        sets = ", ".join(f"{k} = ?" for k in diffs)
        con.execute(f"UPDATE masks SET {sets}, edited_at = ?, "
                    "edits = list_concat(coalesce(edits, []::VARCHAR[]), ?) WHERE id = ?",
                    [*(list(v) if k == "tags" else v for k, v in diffs.items()), now, lines,
                     mask.id])
        attrs = dict(mask.store.group.attrs)
        for key, value in diffs.items():
            attrs[key] = list(value) if key == "tags" else value
        extra = dict(attrs.get("extra") or {})
        extra["edits"] = [*extra.get("edits", []), *lines]
        attrs["extra"] = extra
        undo = replace_attributes(mask.path, attrs)
        crash_point("edit:attributes-replaced")

        def settle(committed: bool | None) -> None:
            if committed is False:
                undo()

        home.index.on_exit(settle)
    return home.get(mask.id)


# --- issue 26: fsck finds a store whose zarr.json is ahead of (or disagrees with) the index ---
def store_edits_check(home: Home, con: duckdb.DuckDBPyConnection, busy: set[str]
                      ) -> list[tuple[str, str, str, Callable[[], None]]]:
    """For each registered mask with a local store: the edits its ``zarr.json`` records
    (``extra.edits``) against ``masks.edits``. ``(kind, subject, message, fix)`` for each
    that disagrees: ``edit-uncommitted`` when the store holds the index's edits and more and
    an editable field differs (an ``edit`` killed between its rename and its commit; more
    lines with every field equal are history a pulled store brought before registration
    copied it into the row: not a problem), ``edit-mismatch`` otherwise. The fix
    writes the index's editable fields and edits into the store (the index is what was
    committed). Reads ``zarr.json`` as JSON; no zarr."""
    from maskhub.storage.store import replace_attributes

    rows = con.execute(f"SELECT id, edits, {', '.join(EDITABLE)} FROM masks "
                       "WHERE store_url IS NULL ORDER BY name").fetchall()
    out: list[tuple[str, str, str, Callable[[], None]]] = []
    for mask_id, edits, *values in rows:
        doc_path = home.store_path(mask_id) / "zarr.json"
        if mask_id in busy or not doc_path.is_file():
            continue  # a write in progress, or a missing store (its own finding)
        try:
            attrs = json.loads(doc_path.read_bytes()).get("attributes") or {}
        except (OSError, ValueError):
            continue  # an unreadable store: the store checks report it
        indexed = list(edits or [])
        stored = list((attrs.get("extra") or {}).get("edits") or [])
        if stored == indexed:
            continue
        row = dict(zip(EDITABLE, values, strict=True))
        subject = f"mask {row['name']} ({mask_id[:8]})"
        fields = [k for k in EDITABLE
                  if (list(row[k] or []) if k == "tags" else row[k])
                  != (list(attrs.get(k) or []) if k == "tags" else attrs.get(k))]
        differ = f" ({', '.join(fields)} differ)" if fields else ""
        if stored[:len(indexed)] == indexed and not fields:
            continue  # history a pulled store brought, registered before rows recorded it
        if stored[:len(indexed)] == indexed:
            kind = "edit-uncommitted"
            message = (f"{subject}: its store records {len(stored) - len(indexed)} edit(s) "
                       f"the index does not{differ}, e.g. {stored[len(indexed)]!r} (a "
                       "`maskhub edit` killed before its commit; repair: put the index's "
                       "metadata back in the store)")
        else:
            kind = "edit-mismatch"
            message = (f"{subject}: its store records {len(stored)} edit(s), the index "
                       f"{len(indexed)}, not the same ones{differ} (repair: write the "
                       "index's metadata into the store)")
        out.append((kind, subject, message,
                    _restore(doc_path.parent, attrs, row, indexed, replace_attributes)))
    return out


def _restore(path: Path, attrs: dict[str, Any], row: dict[str, Any], edits: list[str],
             replace: Callable[[Path, dict], Callable[[], None]]) -> Callable[[], None]:
    """A fix that writes the row's editable fields and edits into the store's attributes."""
    def fix() -> None:
        new = dict(attrs)
        for key in EDITABLE:
            new[key] = list(row[key] or []) if key == "tags" else row[key]
        extra = dict(new.get("extra") or {})
        if edits:
            extra["edits"] = edits
        else:
            extra.pop("edits", None)
        new["extra"] = extra
        replace(path, new)
    return fix
