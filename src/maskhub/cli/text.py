"""Data printed verbatim and harmless: the one function every printer of the CLI uses.

Values come from users (``--notes``, ``--tag``, a mask name, a pulled repo's metadata, the
result of a user's SQL): they are printed as text, never as markup (the printers hand rich
``Text`` objects, not strings, so ``[/]``, ``[bold]`` or ``:x:`` show as typed), and every
character that could act on the terminal or hide what follows is shown escaped:

- C0 controls and DEL (ESC, BEL, CR, LF, TAB, BS...) as ``\\n``, ``\\r``, ``\\t``, ``\\x1b``...;
- C1 controls (U+0080-U+009F) as ``\\x9b``...;
- bidi overrides, embeddings, isolates and marks (U+202A-U+202E, U+2066-U+2069, U+200E,
  U+200F, U+061C), line and paragraph separators (U+2028, U+2029) and invisible
  zero-width characters (U+200B, U+2060, U+FEFF) as ``\\u202e``...

A backslash is printed as itself. Machine output (``--json``, ``--format csv``) is not
escaped: JSON escapes control characters itself and CSV keeps values exact.

Tables are drawn here too (:func:`table_lines`), as plain text in rich's look, at a cost
proportional to the cells shown (rich's renderer took ~10 ms per row).
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence
from typing import TextIO

#: Longest cell a table prints, in characters (after escaping); longer ones end in ``…``.
MAX_CELL = 120

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNICODE = (0x061C, 0x200B, 0x200E, 0x200F, 0x2028, 0x2029, 0x202A, 0x202B, 0x202C, 0x202D,
            0x202E, 0x2060, 0x2066, 0x2067, 0x2068, 0x2069, 0xFEFF)


def _escape_table() -> dict[int, str]:
    table: dict[int, str] = {}
    for code in [*range(0x20), 0x7F, *range(0x80, 0xA0)]:
        table[code] = _NAMED.get(chr(code), f"\\x{code:02x}")
    for code in _UNICODE:
        table[code] = f"\\u{code:04x}"
    return table


_ESCAPES = _escape_table()


def visible(text: str) -> str:
    """``text`` with every control, bidi and invisible formatting character escaped (see the
    module docstring): safe to write to a terminal, one line, and shows what it holds."""
    return text.translate(_ESCAPES)


def shorten(text: str, width: int = MAX_CELL) -> str:
    """``text`` cut to at most ``width`` characters, ending in ``…`` when cut."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def cell(text: str, width: int = MAX_CELL) -> str:
    """A table cell: :func:`visible`, then :func:`shorten`."""
    return shorten(visible(text), width)


def width_of(text: str) -> int:
    """Terminal columns ``text`` takes: East Asian wide and full-width characters count 2,
    combining marks 0 (``text`` already :func:`visible`)."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(ch) else
               2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _fold(text: str, width: int) -> list[str]:
    """``text`` cut into pieces of at most ``width`` columns."""
    if width_of(text) <= width:
        return [text]
    pieces, piece, used = [], "", 0
    for ch in text:
        w = width_of(ch)
        if used + w > width and piece:
            pieces.append(piece)
            piece, used = "", 0
        piece += ch
        used += w
    return [*pieces, piece] if piece else pieces


def _pad(text: str, width: int) -> str:
    return text + " " * (width - width_of(text))


def _fit(widths: list[int], limit: int, gap: int) -> list[int]:
    """Column widths whose row (with ``gap`` columns between cells) fits in ``limit``:
    the widest columns are narrowed first, none below 8 (or its own width)."""
    widths = list(widths)
    while sum(widths) + gap * (len(widths) - 1) > limit:
        widest = max(range(len(widths)), key=lambda i: widths[i])
        if widths[widest] <= 8:
            break
        widths[widest] -= 1
    return widths


def table_lines(columns: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None,
                max_width: int | None = None, bold: bool = False) -> list[str]:
    """The lines of a table (headers and cells already :func:`cell`-made): the header row
    joined by `` ┃ ``, a ``━`` rule, then the rows joined by `` │ ``; cells padded, the
    trailing spaces of each line dropped. With ``max_width`` (a terminal's width) the widest
    columns are narrowed to fit and their cells folded over several lines; ``bold``: the
    header in bold (ANSI)."""
    widths = [width_of(c) for c in columns]
    for r in rows:
        for i, v in enumerate(r):
            w = width_of(v)
            if w > widths[i]:
                widths[i] = w
    if max_width:
        widths = _fit(widths, max_width, 3)
    out = [title] if title else []

    def emit(cells: Sequence[str], sep: str, style: str = "") -> None:
        folded = [_fold(c, w) if w else [c] for c, w in zip(cells, widths, strict=True)]
        for k in range(max(len(f) for f in folded)):
            parts = [_pad(f[k] if k < len(f) else "", w) for f, w in zip(folded, widths,
                                                                           strict=True)]
            line = sep.join(parts).rstrip()
            out.append(f"\x1b[{style}m{line}\x1b[0m" if style and line else line)

    emit(columns, " ┃ ", "1" if bold else "")
    out.append("━╇━".join("━" * w for w in widths))
    for r in rows:
        emit(r, " │ ")
    return out


def styled(stream: TextIO) -> bool:
    """Whether to style (bold, colour) what goes to ``stream``: a terminal, ``NO_COLOR``
    unset, ``TERM`` not ``dumb``."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
