"""Johnson-Lindenstrauss projection of per-example gradients (TRAK's P), never held whole,
with an exact int8 route on CPUs with VNNI."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

PROJECTION_CHUNK = 1024  # rows of P per seeded generator call; fixes P independently of block size
PROJECTOR_VERSION = 2  # bump whenever P's generation changes: feature stores record it and refuse a mismatch
INT8_SLICES = 4  # 4 slices hold 29 bits of each gradient row: more than float32's 24
INT8_RADIX = 128
INT8_ROW_BLOCK = 512


def int8_slices(g: torch.Tensor, slices: int = INT8_SLICES) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Split float rows into int8 slices: g = scale * sum_j q_j / 128^j, exact to within
    float32 rounding of each entry plus 0.5 / 128^(slices-1) of ``scale`` (= each row's
    max |g| / 127).

    g: (n, d) -> ([slices x (n, d) int8], scale (n, 1)). With an integer P, g P is then a
    few exact int8 GEMMs (int32 accumulation), which run ~8x faster than one float32 GEMM
    on CPUs with VNNI: the scheme of Ozaki et al. for emulating float GEMMs with integers.
    """
    scale = g.abs().amax(1, keepdim=True)
    if not torch.isfinite(scale).all():  # int8 would turn NaN into silent garbage
        bad = torch.nonzero(~torch.isfinite(scale.flatten())).flatten()[:5].tolist()
        raise FloatingPointError(f"non-finite per-example gradients (rows {bad}...); check the model's outputs")
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny) / 127
    r = g / scale
    out = []
    for j in range(slices):
        q = r.round()
        out.append(q.to(torch.int8))
        if j < slices - 1:  # |r - q| <= 1/2, so the next slice fits in [-64, 64]
            r.sub_(q).mul_(INT8_RADIX)
    return out, scale


@dataclass(frozen=True)
class Projector:
    """A seeded d x k Johnson-Lindenstrauss matrix, never materialised whole.

    Entries are ±1/sqrt(k) (rademacher) or N(0, 1/k) (gaussian), so E[P P^T] = I and
    inner products are preserved in expectation. Row chunk c of model m comes from a
    generator seeded by (seed, m, c).
    """

    dim: int  # d
    proj_dim: int  # k
    seed: int = 0
    model_index: int = 0
    kind: str = "rademacher"
    block_rows: int = 16 * PROJECTION_CHUNK  # rows of P held at once (a P this small is generated once and kept)
    backend: str = "torch"  # or "fast_jl": MadryLab's CUDA kernel (another P, same distribution and scale)

    def __post_init__(self):
        if self.kind not in ("rademacher", "gaussian"):
            raise ValueError(f"trak.proj_type={self.kind!r} is not allowed; allowed values: rademacher, gaussian")
        if self.backend not in ("torch", "fast_jl"):
            raise ValueError(f"projector backend {self.backend!r} is not allowed; allowed values: torch, fast_jl")
        if self.proj_dim < 1:
            raise ValueError(f"trak.proj_dims must be >= 1, got {self.proj_dim}")

    def _generator(self, c: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.model_index, c, 5]).generate_state(1)[0]))

    def _signs(self, c: int) -> torch.Tensor:
        """Row chunk ``c`` of sqrt(k) P for the rademacher kind: (rows, k) int8 of ±1."""
        rows = min(PROJECTION_CHUNK, self.dim - c * PROJECTION_CHUNK)
        size = rows * self.proj_dim
        # 8 fair signs per random byte: ~2.5x cheaper than drawing normals, ~3x than randint per entry
        words = torch.randint(0, 256, (-(-size // 8),), dtype=torch.uint8, generator=self._generator(c))
        bits = ((words.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).view(torch.int8)
        return bits.reshape(-1)[:size].view(rows, self.proj_dim).mul_(2).sub_(1)

    def _chunk(self, c: int, device, dtype) -> torch.Tensor:
        if self.kind == "gaussian":
            rows = min(PROJECTION_CHUNK, self.dim - c * PROJECTION_CHUNK)
            block = torch.randn(rows, self.proj_dim, generator=self._generator(c))
        else:
            block = self._signs(c).to(torch.float32)
        return (block / self.proj_dim ** 0.5).to(device=device, dtype=dtype)

    def _blocks(self, make: Callable[[int], torch.Tensor], key):
        """(first row, rows of P), concatenating ``make(c)`` over row chunks c: at most
        ``block_rows`` rows at a time, or, when P fits in that, the whole P made once per
        projector and cached under ``key``."""
        n_chunks = -(-self.dim // PROJECTION_CHUNK)
        if self.dim <= self.block_rows:
            cache = self.__dict__.setdefault("_cache", {})
            if key not in cache:
                cache[key] = torch.cat([make(c) for c in range(n_chunks)])
            yield 0, cache[key]
            return
        per_block = max(1, self.block_rows // PROJECTION_CHUNK)
        for c0 in range(0, n_chunks, per_block):
            yield c0 * PROJECTION_CHUNK, torch.cat([make(c) for c in range(c0, min(c0 + per_block, n_chunks))])

    def uses_int8(self, g: torch.Tensor) -> bool:
        """Whether ``project(g)`` takes the exact int8 route (see :func:`int8_slices`): float32
        gradients on a CPU with VNNI, a rademacher P and the torch backend."""
        vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
        return self.kind == "rademacher" and self.backend == "torch" and g.device.type == "cpu" and g.dtype == torch.float32 and vnni

    def _project_int8(self, g: torch.Tensor) -> torch.Tensor:
        """g P with P's ±1 exact in int8 and g split by :func:`int8_slices`: integer products
        accumulate exactly in int32, so the only rounding is the slices' (2^-29 of each row's
        max, on top of float32 rounding of each entry) and the float32 sum of the slice
        products: measured, a third of a float32 GEMM's error (tests/test_trak.py)."""
        cached = self.dim <= self.block_rows
        # cached: row blocks keep the slicing in cache; else each P block is made once, so all rows go at once
        rows = INT8_ROW_BLOCK if cached else len(g)
        # int32 cannot overflow: one product sums at most block_rows terms of size <= 127
        out = torch.zeros(g.shape[0], self.proj_dim, dtype=torch.float32)
        parts = [(a, *int8_slices(g[a:a + rows])) for a in range(0, len(g), rows)]
        for col, p8 in self._blocks(self._signs, "int8"):
            for a, slices, scale in parts:
                for j, q in enumerate(slices):
                    out[a:a + len(q)] += torch._int_mm(q[:, col:col + p8.shape[0]], p8).float().mul_(INT8_RADIX ** -j)
        for a, slices, scale in parts:
            out[a:a + len(slices[0])] *= scale / self.proj_dim ** 0.5
        return out

    def _project_fast_jl(self, g: torch.Tensor) -> torch.Tensor:
        if not g.is_cuda:
            raise ValueError("the fast_jl projector needs gradients on a CUDA device; use the torch backend on CPU")
        import fast_jl

        tile = 8 if len(g) <= 8 else 16 if len(g) <= 16 else 32
        fn = getattr(fast_jl, f"project_{'rademacher' if self.kind == 'rademacher' else 'normal'}_{tile}")
        seed = int(np.random.SeedSequence([self.seed, self.model_index, 5]).generate_state(1)[0] % 2**31)
        sms = torch.cuda.get_device_properties(g.device).multi_processor_count
        return fn(g.contiguous(), self.proj_dim, seed, sms).to(g.dtype) / self.proj_dim ** 0.5

    def matrix(self, rows: slice | None = None) -> torch.Tensor:
        """P (or some of its rows) as a dense tensor: for tests and small d only."""
        full = torch.cat([self._chunk(c, "cpu", torch.float32) for c in range(-(-self.dim // PROJECTION_CHUNK))])
        return full if rows is None else full[rows]

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """(n, d) -> (n, k), holding at most ``block_rows`` rows of P at a time."""
        if g.shape[1] != self.dim:
            raise ValueError(f"gradients have {g.shape[1]} columns, the projector expects d={self.dim}")
        if self.backend == "fast_jl":
            return self._project_fast_jl(g)
        if self.uses_int8(g):
            return self._project_int8(g)
        out = None
        for a, p in self._blocks(lambda c: self._chunk(c, g.device, g.dtype), (g.device, g.dtype)):
            part = g[:, a:a + p.shape[0]] @ p
            out = part if out is None else out.add_(part)
        return out




def projector_backend(device: torch.device) -> str:
    """``fast_jl`` on a CUDA device when MadryLab's kernel is installed, else ``torch``: never required."""
    return "fast_jl" if device.type == "cuda" and importlib.util.find_spec("fast_jl") is not None else "torch"
