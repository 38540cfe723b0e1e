"""CLIP's two towers (Radford et al., 2021): an MLP image tower at the digits' size, a ResNet-9 one at COCO's."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from datalens.core.models import MODELS


class TwoTower(nn.Module):
    """A CLIP-like pair of encoders: an image tower (an MLP, or a registered architecture such as
    ResNet-9 with ``dim`` outputs) and a bag-of-words text encoder into one space, with a learned
    temperature (Radford et al., 2021).

    ``forward(images (B, *input_shape), tokens (B, L) int64, 0 = pad)`` returns (B, 2, dim): the
    image and the text embedding, each of unit length times sqrt(exp(logit_scale)), so that
    their dot product is the temperature-scaled cosine CLIP's loss takes. The text side is a
    bag of words through a linear layer (no embedding lookup), so models stack under ``vmap`` (an
    image tower with batch norm, such as ResNet-9, trains one model at a time).
    """

    def __init__(self, input_shape: Sequence[int], vocab_size: int, dim: int = 32, image_hidden: int = 64, text_hidden: int = 64,
                 init_temperature: float = 0.07, image_tower: str = "mlp", width: int = 64):
        super().__init__()
        self.vocab_size = vocab_size
        if image_tower == "mlp":
            self.image = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), image_hidden), nn.ReLU(), nn.Linear(image_hidden, dim))
        elif image_tower in MODELS:
            self.image = MODELS[image_tower](input_shape, dim, width=width)
        else:
            raise ValueError(f"model.image_tower={image_tower!r} is unknown; allowed values: mlp, {', '.join(MODELS)}")
        self.text = nn.Sequential(nn.Linear(vocab_size, text_hidden), nn.ReLU(), nn.Linear(text_hidden, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # word counts by comparison with every id (one_hot checks its input's range, which vmap cannot); the pad id 0 is dropped
        ids = torch.arange(1, self.vocab_size, device=tokens.device)
        words = (tokens.unsqueeze(-1) == ids).to(images.dtype).sum(-2)
        bag = torch.cat([torch.zeros_like(words[..., :1]), words], -1) / words.sum(-1, keepdim=True).clamp_min(1)
        pair = torch.stack([self.image(images), self.text(bag)], -2)
        return pair / pair.norm(dim=-1, keepdim=True) * torch.exp(0.5 * self.logit_scale)


def two_tower(input_shape: Sequence[int], num_outputs: int, dim: int = 32, image_hidden: int = 64, text_hidden: int = 64,
              image_tower: str = "mlp", width: int = 64) -> TwoTower:
    """``model.name: datalens.core.two_tower:two_tower``; ``num_outputs`` is the vocabulary size
    (the class count of a pairs dataset); ``image_tower`` mlp (``image_hidden`` units) or a
    registered architecture (``width``, e.g. resnet9)."""
    return TwoTower(input_shape, num_outputs, dim, image_hidden, text_hidden, image_tower=image_tower, width=width)
