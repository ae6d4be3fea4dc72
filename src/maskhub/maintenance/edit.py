"""``maskhub edit``: correct a registered mask's metadata after the fact, recorded.

The index row and the store's group attributes change together, under the index's
exclusive lock: the row is updated, the store's attributes are replaced (a local
``zarr.json`` by an atomic rename), then the transaction commits; if it does not commit, the
old attributes are put back. Each edit is recorded: ``masks.edited_at`` and one line per
changed field appended to ``masks.edits`` (``"<when> base_model: 'old' -> 'new'"``), mirrored
in the store's ``extra.edits``. The bits, counts and fingerprints are never edited: they are
what the diff measured.
"""

from __future__ import annotations

from typing import Any

from maskhub.core.home import Home
from maskhub.core.provenance import timestamp
from maskhub.core.record import MaskRecord
from maskhub.errors import NameTakenError, UsageError
from maskhub.schemas.names import invalid_mask_name_message, valid_mask_name

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

        def settle(committed: bool | None) -> None:
            if committed is False:
                undo()

        home.index.on_exit(settle)
    return home.get(mask.id)
