"""A tiny Llama-shaped causal language model built from a config (no download needed).

Parameter names follow Hugging Face Llama (``model.layers.N.self_attn.q_proj.weight``...), so
masks of this model exercise the same name parsing as real checkpoints. Used by ``maskhub
demo``, the tests and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyConfig:
    """Shape of a :class:`TinyLlama`."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 4
    num_heads: int = 4
    max_len: int = 64


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale initialised to one."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    """Causal multi-head self-attention."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.n_heads = cfg.num_heads
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, t, h = x.shape
        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.n_heads, h // self.n_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                           heads(self.v_proj(x)), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, h))


class MLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, blocks and final norm (the ``model.`` prefix of Llama checkpoints)."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Parameter(torch.zeros(cfg.max_len, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.embed_tokens(ids) + self.pos[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class TinyLlama(nn.Module):
    """Causal LM: ``forward(ids)`` returns logits; :meth:`loss` the next-token loss."""

    def __init__(self, cfg: TinyConfig | None = None) -> None:
        """Build with ``cfg`` (default :class:`TinyConfig`)."""
        super().__init__()
        self.config = cfg or TinyConfig()
        self.model = Backbone(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, seq, vocab)``."""
        return self.lm_head(self.model(ids))

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over a batch of token sequences."""
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def synthetic_batches(cfg: TinyConfig, n: int, batch: int = 16, seq: int = 32,
                      seed: int = 0) -> list[torch.Tensor]:
    """Token sequences following a fixed affine rule mod vocab, with noise (learnable)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g)
        steps = torch.arange(seq).unsqueeze(0)
        ids = (start * 5 + steps * 7) % cfg.vocab_size
        noise = torch.rand(batch, seq, generator=g) < 0.1
        ids = torch.where(noise, torch.randint(0, cfg.vocab_size, (batch, seq), generator=g), ids)
        out.append(ids)
    return out


def train(model: nn.Module, batches: list[torch.Tensor], lr: float, weight_decay: float = 0.0,
          seed: int = 0) -> list[float]:
    """A few AdamW steps in fp32 over ``batches``; returns the losses."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        loss = model.loss(ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
