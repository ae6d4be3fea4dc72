"""Write one benchmark's section of BENCHMARKS.md, leaving the other sections as they are."""

from __future__ import annotations

from pathlib import Path

HEADER = ("# Benchmarks\n\nEach section is written by the script it names, from one run "
          "that measures maskhub and its baseline side by side; rerun a script to refresh its "
          "section.\n")


def write_section(path: Path, key: str, body: str) -> None:
    """Replace the text between ``<!-- begin KEY -->`` and ``<!-- end KEY -->`` in ``path``
    with ``body`` (appending the section, or creating the file, when it is not there)."""
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    text = path.read_text() if path.exists() else HEADER
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
