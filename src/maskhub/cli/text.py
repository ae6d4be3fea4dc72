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
"""

from __future__ import annotations

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
