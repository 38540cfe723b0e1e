"""Timestep-conditioned denoisers for DDPMs: ``model(x_t, t) -> predicted noise`` with x_t of the
input's shape and t (B,) the timestep as a fraction of the schedule, in [0, 1).

* ``datalens.core.denoisers:mlp_denoiser``: flat inputs (the digits), the image concatenated with a
  sinusoidal embedding of t, SiLU hidden layers;
* ``datalens.core.denoisers:unet_denoiser``: images (C, H, W), a small U-Net (Ronneberger et al.,
  2015, as DDPMs use it: residual conv blocks with GroupNorm and the timestep added to each
  block, one downsampling per level, skip connections), the Journey paper's CIFAR-10 model in
  miniature.

Neither has buffers (the embedding's frequencies are computed in the forward), so both train
stacked under ``torch.func.vmap`` (:mod:`datalens.training.engine`) and compose with per-example
gradients.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of t (B,) in [0, 1) (scaled to [0, max_period)), as in DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() * max_period)[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], -1)


class MLPDenoiser(nn.Module):
    def __init__(self, dim: int, hidden: Sequence[int], time_dim: int):
        super().__init__()
        self.time_dim = time_dim
        layers, width = [], dim + time_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, timestep_embedding(t, self.time_dim).to(x.dtype)], -1))


def mlp_denoiser(input_shape: Sequence[int], num_outputs: int = 0, hidden: Sequence[int] = (128, 128), time_dim: int = 32,
                 **_: object) -> nn.Module:
    """An MLP denoiser of flat inputs (D,); ``num_outputs`` is unused (the output is the input's shape)."""
    return MLPDenoiser(math.prod(input_shape), list(hidden), time_dim)


class _Block(nn.Module):
    """Two 3x3 convolutions with GroupNorm and SiLU, the timestep embedding added between them, and
    a residual connection (1x1 where the width changes)."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(groups, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(min(groups, c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(nn.functional.silu(self.norm2(h)))


class UNetDenoiser(nn.Module):
    def __init__(self, channels: int, width: int, levels: int, time_dim: int, groups: int):
        super().__init__()
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU())
        widths = [width * 2 ** i for i in range(levels)]
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.ModuleList(_Block(c_in, c, time_dim, groups) for c_in, c in zip([width] + widths[:-1], widths))
        self.mid = _Block(widths[-1], widths[-1], time_dim, groups)
        self.up = nn.ModuleList(_Block(2 * c, c_out, time_dim, groups) for c, c_out in zip(widths[::-1], widths[::-1][1:] + [width]))
        self.head = nn.Sequential(nn.GroupNorm(min(groups, width), width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.time_dim).to(x.dtype))
        h, skips = self.stem(x), []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.down) - 1:
                h = nn.functional.avg_pool2d(h, 2)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            if h.shape[-1] != skips[-1].shape[-1]:
                h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skips.pop()], 1), emb)
        return self.head(h)


def unet_denoiser(input_shape: Sequence[int], num_outputs: int = 0, width: int = 32, levels: int = 3, time_dim: int = 64,
                  groups: int = 8, **_: object) -> nn.Module:
    """A small U-Net of images (C, H, W) with H and W divisible by 2^(levels - 1)."""
    channels, h, w = input_shape
    if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
        raise ValueError(f"model.levels={levels}: {h}x{w} images must be divisible by {2 ** (levels - 1)}")
    return UNetDenoiser(channels, width, levels, time_dim, groups)
