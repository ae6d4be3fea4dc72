"""Is it the same model? A mask (or a checkpoint) against a model, by tensor names and shapes.

Two checkpoints of one architecture share every tensor name and shape; a mask of another
architecture (or another size of the same family) shares few. When fewer than half of one
side's tensors have the same name and shape on the other side, the two are of different
models: that is said in one line, instead of a list of "missing" tensors that invites
``--allow-missing`` / ``extra='ignore'`` to compare the handful that happen to match.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Shapes = Mapping[str, Sequence[int]]


def another_model(one: Shapes, other: Shapes, one_label: str = "the mask",
                  other_label: str = "the model") -> str | None:
    """Why the tensors ``one`` (``{name: shape}``) are not of the model whose tensors are
    ``other``, as a clause such as ``"only 12 of the 290 tensors of the mask are in the
    model with the same name and shape (e.g. 'x' is [896, 896] in the mask and [4096, 4096]
    in the model)"``;
    ``None`` when at least half of them are (then a detailed per-tensor message is right)."""
    if not one:
        return None
    same = [n for n, s in one.items() if n in other and tuple(other[n]) == tuple(s)]
    if 2 * len(same) >= len(one):
        return None
    differing = next((n for n in one if n in other and tuple(other[n]) != tuple(one[n])), None)
    if differing is not None:
        example = (f"e.g. {differing!r} is {list(one[differing])} in {one_label} and "
                   f"{list(other[differing])} in {other_label}")
    else:
        example = f"e.g. {other_label} has no {next(n for n in one if n not in other)!r}"
    return (f"only {len(same)} of the {len(one)} tensors of {one_label} are in {other_label} "
            f"with the same name and shape ({example})")
