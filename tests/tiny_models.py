"""A tiny digits MLP the TRAK tests share: small enough (310 parameters) to attribute unprojected."""
import torch
from torch import nn


def trained_digits_mlp(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int) -> nn.Module:
    """A 64-4-10 MLP initialised from ``seed`` and trained full-batch with Adam (lr 0.01) for ``steps``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 10))
    opt = torch.optim.Adam(model.parameters(), 0.01)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model
