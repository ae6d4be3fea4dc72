"""The model-size options the training benchmarks share (a TinyLlama of a given shape)."""

from __future__ import annotations

import argparse

from maskhub.demo.tinymodel import TinyConfig


def add_model_args(ap: argparse.ArgumentParser, batch: int, seq: int) -> None:
    """``--hidden --layers --inter --vocab`` (a 134M-parameter model by default), ``--batch``
    and ``--seq`` with these defaults."""
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--seq", type=int, default=seq)


def model_config(args: argparse.Namespace, max_len: int) -> TinyConfig:
    """The :class:`TinyConfig` those options describe (one head per 64 hidden units)."""
    return TinyConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.inter, num_layers=args.layers,
                      num_heads=max(1, args.hidden // 64), max_len=max_len)
