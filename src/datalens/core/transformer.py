"""A small transformer (Vaswani et al., 2017; pre-norm as in GPT-2) for the language-model stages:
a causal language model (the mT5 fact-tracing case) or an encoder classifier (the BERT case).

Attention is written out (no fused kernel, no boolean mask argument): the mask is built from the
token ids by broadcasting, with no data-dependent shapes or branches, so the model composes with
``torch.func.vmap`` both ways the repo uses it, over stacked models' weights (training) and over
single examples (per-example gradients). A position may always attend to itself, so a padding
position never has every key masked and no softmax sees only -inf (no NaN to leak into gradients).
No buffers: models stack under ``vmap`` in the engine.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.dim={dim} must be a multiple of model.heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """h (B, L, dim); allowed (B, 1, L, L) bool, query by key. Returns (B, L, dim)."""
        b, length, dim = h.shape
        q, k, v = self.qkv(h).reshape(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)  # each (B, H, L, dh)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)
        weights = torch.softmax(torch.where(allowed, scores, torch.finfo(scores.dtype).min), -1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, length, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.norm1(h), allowed)
        return h + self.mlp(self.norm2(h))


class Transformer(nn.Module):
    """Token ids (B, L) int64, 0 = padding (at the end), to ``num_outputs`` logits per position,
    (B, L, num_outputs) (``pool='none'``, a language model's next-token logits), or per sequence,
    (B, num_outputs) (``pool='mean'``: the mean of the non-padding positions' final states, a
    classifier). ``causal`` lets each position attend only to itself and earlier positions."""

    def __init__(self, vocab_size: int, length: int, num_outputs: int, dim: int = 32, layers: int = 2, heads: int = 2,
                 causal: bool = True, pool: str = "none"):
        super().__init__()
        if pool not in ("none", "mean"):
            raise ValueError(f"model.pool={pool!r} is unknown; allowed values: none, mean")
        self.causal, self.pool, self.vocab_size = causal, pool, vocab_size
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(0.02 * torch.randn(length, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final normalised states (B, L, dim)."""
        length = tokens.shape[-1]
        real = tokens > 0
        allowed = real[:, None, None, :] | torch.eye(length, dtype=torch.bool, device=tokens.device)
        if self.causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
        h = self.embed(tokens) + self.position[:length]
        for block in self.blocks:
            h = block(h, allowed)
        return self.norm(h)

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """A sequence's representation (B, dim): the mean of its non-padding positions' final states."""
        real = (tokens > 0).to(self.position.dtype).unsqueeze(-1)
        return (self.hidden(tokens) * real).sum(-2) / real.sum(-2).clamp_min(1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool == "mean":
            return self.head(self.embedding(tokens))
        return self.head(self.hidden(tokens))


def transformer(input_shape: Sequence[int], num_outputs: int, vocab_size: int | None = None, dim: int = 32, layers: int = 2,
                heads: int = 2, causal: bool = True, pool: str = "none") -> Transformer:
    """``model.name: datalens.core.transformer:transformer``. Inputs are token ids (L,); a language
    model's ``num_outputs`` is its vocabulary (``vocab_size`` defaults to it); a classifier gives
    ``vocab_size``, ``pool: mean`` and usually ``causal: false``."""
    return Transformer(vocab_size or num_outputs, int(input_shape[-1]), num_outputs, dim, layers, heads, causal, pool)
