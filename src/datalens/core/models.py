"""Models by name: ``mlp`` (the digits default), ``cnn`` (small, no batch norm) and
``resnet9`` (the standard fast CIFAR-10 ResNet-9, with batch norm); or your own, by import
path (``package.module:function`` or ``path/to/file.py:function``), a function
``f(input_shape, num_outputs, **model_params) -> nn.Module``.

Models without batch norm or other buffers train batched across models
(see :mod:`datalens.training.engine`); ``resnet9`` trains one model at a time.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from datalens.core.data import resolve_callable


def mlp(input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (64, 64), **_: object) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def cnn(input_shape: Sequence[int], num_outputs: int, width: int = 32, **_: object) -> nn.Module:
    """Two conv blocks and a linear head; accepts flat inputs of a square image (e.g. digits)."""
    if len(input_shape) == 1:
        side = int(round(math.sqrt(input_shape[0])))
        if side * side != input_shape[0]:
            raise ValueError(f"model.name='cnn' needs image inputs; got flat inputs of size {input_shape[0]}")
        channels, pre = 1, [nn.Unflatten(1, (1, side, side))]
    else:
        channels, pre = input_shape[0], []
    return nn.Sequential(
        *pre,
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(8 * width, num_outputs),
    )


def _conv_bn(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def resnet9(input_shape: Sequence[int], num_outputs: int, width: int = 64, **_: object) -> nn.Module:
    """ResNet-9 as in the fast CIFAR-10 training recipes the datamodels/TRAK papers use."""
    w = width
    return nn.Sequential(
        _conv_bn(input_shape[0], w),
        _conv_bn(w, 2 * w), nn.MaxPool2d(2),
        _Residual(nn.Sequential(_conv_bn(2 * w, 2 * w), _conv_bn(2 * w, 2 * w))),
        _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        _conv_bn(4 * w, 8 * w), nn.MaxPool2d(2),
        _Residual(nn.Sequential(_conv_bn(8 * w, 8 * w), _conv_bn(8 * w, 8 * w))),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(8 * w, num_outputs, bias=False), _Scale(0.125),
    )


MODELS = {"mlp": mlp, "cnn": cnn, "resnet9": resnet9}


def build_model(name: str, input_shape: Sequence[int], num_outputs: int, repo: str = ".", **kwargs: object) -> nn.Module:
    """A fresh model by registered name or import path (resolved against ``repo``); the
    other ``model.*`` params are its keyword arguments."""
    if name in MODELS:
        return MODELS[name](input_shape, num_outputs, **kwargs)
    if ":" not in name:
        raise ValueError(f"model.name={name!r} is unknown; allowed values: {', '.join(MODELS)}, or an import path "
                         "'package.module:function' or 'path/to/file.py:function'")
    model = resolve_callable(name, "model.name", repo)(input_shape, num_outputs, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.name={name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def batchable(model: nn.Module) -> bool:
    """True when models of this architecture can train stacked under ``torch.func.vmap``
    (no buffers, so no batch-norm running statistics)."""
    return not any(True for _ in model.buffers())
