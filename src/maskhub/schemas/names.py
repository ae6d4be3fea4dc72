"""Parse transformer parameter names into (layer index, module kind)."""

from __future__ import annotations

import re

# Block containers used by common architectures: Llama/Qwen/Mistral `layers`, GPT-2 `h`,
# BLOOM/Falcon `h`, T5/BERT `block`/`layer`, generic `blocks`.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.(.+)$")
_PREFIXES = ("model.", "transformer.", "language_model.model.", "language_model.")
_SUFFIXES = (".weight", ".bias")


def parse_tensor_name(name: str) -> tuple[int | None, str]:
    """Return ``(layer, module)`` for a parameter name.

    ``model.layers.12.self_attn.q_proj.weight`` gives ``(12, "self_attn.q_proj")``;
    names outside the repeated blocks give ``(None, module)``, for example
    ``model.embed_tokens.weight`` gives ``(None, "embed_tokens")``.
    """
    m = _BLOCK.search(name)
    if m:
        layer: int | None = int(m.group(1))
        rest = m.group(2)
    else:
        layer = None
        rest = name
        for prefix in _PREFIXES:
            if rest.startswith(prefix):
                rest = rest[len(prefix):]
                break
    for suffix in _SUFFIXES:
        if rest.endswith(suffix) and rest != suffix[1:]:
            rest = rest[: -len(suffix)]
            break
    return layer, rest


#: A mask name: letters, digits, '.', '_' and '-', starting with a letter or digit (it appears
#: in file names, SQL and Hub repo cards, so it stays plain).
def param_kind(name: str) -> str:
    """What kind of parameter tensor ``name`` is: its last name component (``weight``,
    ``bias``, ...). A module's weight and bias are different matrices in the paper's
    Figure 3: ``tensors.param_kind`` keeps them apart."""
    return name.rsplit(".", 1)[-1]


_MASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def valid_mask_name(name: object) -> bool:
    """Whether ``name`` may name a mask."""
    return isinstance(name, str) and _MASK_NAME.fullmatch(name) is not None


def mask_name_from(text: str, fallback: str = "mask") -> str:
    """A valid mask name made from ``text`` (a directory or repo name): other characters
    become '-', and ``fallback`` is used when nothing is left."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).lstrip("._-")[:180].rstrip("-")
    return name if valid_mask_name(name) else fallback


def invalid_mask_name_message(name: object) -> str:
    """The one-line error for a name that :func:`valid_mask_name` refuses."""
    return (f"invalid mask name {name!r}: use letters, digits, '.', '_' and '-', starting "
            "with a letter or digit (at most 200 characters)")


#: Tensors ``maskhub export --peft`` leaves out by default: embeddings (PEFT's SHiRA adapts
#: ``nn.Linear`` weights only), matched with ``re.search``.
PEFT_EXCLUDE = r"(^|\.)(\w*embed\w*|wte|wpe|shared)\.weight$"
