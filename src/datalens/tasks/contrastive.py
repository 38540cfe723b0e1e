"""Contrastive image-text models (CLIP) as a task: InfoNCE training, the TRAK paper's CLIP output.

Examples are pairs: ``inputs`` images (n, ...) and ``targets`` (n, L + K), a caption's L token
ids followed by the K pool indices of that pair's negatives (``datalens.core.captions``); training
needs only the tokens (``targets[:, :L]``). The model maps (images, tokens) to (B, 2, dim), the
image and text embeddings scaled so that their dot product is the temperature-scaled cosine
(:class:`datalens.core.two_tower.TwoTower`). Raw outputs are (..., B, 1 + K, 2, dim): the pair
itself, then its negatives, embedded by the same model, so the attributed output and its
gradient see the negatives as that model embeds them.

**Loss**: CLIP's symmetric InfoNCE over the minibatch: per example the mean of the image-to-text
and text-to-image cross-entropies of its true partner among the batch (so batch composition is
part of the training noise).

**Output** (Park et al., 2023, the CLIP case): with unit embeddings phi (image), psi (text) of
the pair and phi_j, psi_j of its negatives,
``f = -logsumexp_j(-phi.(psi - psi_j)) - logsumexp_j(-psi.(phi - phi_j))``: the log-odds of
the true caption against the negative captions plus those of the true image against the
negative images, with no temperature inside. **Q** = 1 - (p_i2t + p_t2i) / 2, with p the
temperature-scaled softmax probability of the true partner among itself and the negatives.
The public traker computes Q over the featurising batch (a batch of one gives Q = 0); here it
is over the pair's own negatives, so it does not depend on how examples are batched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from datalens.tasks.base import Task


class ContrastiveTask(Task):
    """Image-caption pairs; see the module docstring. ``pool_images`` (P, ...) and ``pool_tokens``
    (P, L) are the fixed pool negatives are drawn from, on the models' device."""

    name = "contrastive"
    metric_name = "retrieval accuracy"

    def __init__(self, pool_images: torch.Tensor, pool_tokens: torch.Tensor):
        self.pool_images, self.pool_tokens = pool_images, pool_tokens
        self.length = pool_tokens.shape[1]

    @classmethod
    def of_pairs(cls, x_test: torch.Tensor, y_test: torch.Tensor, negatives: int) -> "ContrastiveTask":
        """The task of a pairs dataset whose targets end in ``negatives`` pool indices and whose pool
        is its test split (``datalens.core.captions.digit_captions``)."""
        return cls(x_test, y_test[:, :y_test.shape[1] - negatives])

    def training_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """The tokens (n, L) alone: training draws its negatives from the batch."""
        return targets[..., :self.length]

    def forward(self, model, inputs, targets):
        pair = model(inputs, targets[..., :self.length]).unsqueeze(-3)  # (B, 1, 2, dim)
        neg = targets[..., self.length:]
        if neg.shape[-1] == 0:
            return pair
        flat = neg.reshape(-1)
        pool_x, pool_t = self.pool_images.to(inputs.device), self.pool_tokens.to(inputs.device)  # no copy when already there
        if flat.numel() > len(pool_x):  # a large batch (measuring, not per-example gradients): embed the pool once, then index
            negatives = model(pool_x, pool_t)[..., flat, :, :]
        else:
            negatives = model(pool_x[flat], pool_t[flat])
        return torch.cat([pair, negatives.reshape(*neg.shape, *negatives.shape[-2:])], -3)

    def loss(self, outputs, targets):
        return self.batch_loss(outputs, targets, torch.ones(outputs.shape[-4], device=outputs.device))

    def batch_loss(self, outputs, targets, weights):
        """Per example (..., B): InfoNCE among the batch's examples of positive ``weights`` (B,)
        (the others, padding, are no one's negatives), times the example's weight."""
        logits = outputs[..., 0, 0, :] @ outputs[..., 0, 1, :].transpose(-1, -2)  # (..., B, B): image i, caption j
        absent = (weights <= 0)
        i2t = logits.masked_fill(absent[None, :], float("-inf"))
        t2i = logits.transpose(-1, -2).masked_fill(absent[None, :], float("-inf"))
        diag = torch.diagonal(logits, dim1=-2, dim2=-1)
        per = 0.5 * (torch.logsumexp(i2t, -1) + torch.logsumexp(t2i, -1)) - diag
        return torch.where(absent, torch.zeros_like(per), per) * weights

    def _similarities(self, outputs):
        unit = F.normalize(outputs, dim=-1)
        phi, psi = unit[..., 0, 0, :], unit[..., 0, 1, :]
        s = (phi * psi).sum(-1)  # (..., B)
        i2t = (phi.unsqueeze(-2) * unit[..., 1:, 1, :]).sum(-1)  # (..., B, K): the image against negative captions
        t2i = (psi.unsqueeze(-2) * unit[..., 1:, 0, :]).sum(-1)
        return s, i2t, t2i

    def output(self, outputs, targets):
        s, i2t, t2i = self._similarities(outputs)
        return -torch.logsumexp(i2t - s.unsqueeze(-1), -1) - torch.logsumexp(t2i - s.unsqueeze(-1), -1)

    def out_to_loss(self, outputs, targets):
        scale = (outputs[..., 0, 0, :] ** 2).sum(-1)  # exp(logit_scale): each embedding has norm sqrt of it
        s, i2t, t2i = self._similarities(outputs)
        p = [torch.softmax(scale.unsqueeze(-1) * torch.cat([s.unsqueeze(-1), other], -1), -1)[..., 0] for other in (i2t, t2i)]
        return 1.0 - 0.5 * (p[0] + p[1])

    def embeddings(self, model, inputs, targets):
        """The pair's image and text embeddings (B, 2, dim), without its negatives."""
        return model(inputs, self.training_targets(targets))

    def cosine(self, outputs: torch.Tensor) -> torch.Tensor:
        """The pair's cosine similarity (..., B): what the counterfactual measures."""
        return self._similarities(outputs)[0]

    def metric(self, outputs, targets):
        s, i2t, t2i = self._similarities(outputs)
        return 0.5 * ((s > i2t.amax(-1)).float() + (s > t2i.amax(-1)).float()).mean(-1)
