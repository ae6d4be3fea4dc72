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


def compile_maskhub() -> str:
    """Byte-compile the maskhub package the benchmark runs (``__pycache__`` next to each
    module), as installing it does; return where it lies.

    A checkout run with ``PYTHONDONTWRITEBYTECODE=1`` (set on the shared development
    machines) otherwise recompiles every maskhub module in every process: ~0.3 CPU-s of
    each command, which no installed copy pays and no peer script (numpy, huggingface_hub:
    installed, compiled) pays either."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("maskhub")
    where = str(Path(spec.submodule_search_locations[0])) if spec and \
        spec.submodule_search_locations else ""
    if where:
        compileall.compile_dir(where, quiet=1)
    return where
