"""Language modelling as a task: next-token cross-entropy, the answer's token margin as the output.

Examples are token sequences: ``inputs`` (n, L) int64 token ids (0 pads) and ``targets`` (n, L),
the token each position should predict, 0 where a position is not scored. A training sentence
scores every next token (its targets are its inputs shifted by one); a fact-tracing query scores
one position, the last of its prompt, whose target is the answer (``datalens.core.facts``). Raw
outputs are next-token logits (..., B, L, V) (:class:`datalens.core.transformer.Transformer`).

* **loss**: the mean cross-entropy over the example's scored positions;
* **output** f: the mean over scored positions of the token margin
  ``logit_y - logsumexp_{j != y} logit_j = log(p_y / (1 - p_y))``; for a query, the answer's
  margin, the output the TRAK paper attributes for mT5's fact tracing;
* **Q** = the mean over scored positions of ``1 - p_y``. For one scored position (a query)
  ``dLoss/df = -Q`` exactly; over a sentence's T positions, ``-grad L = sum_t (1 - p_t) grad f_t / T``
  is ``Q grad f`` when the ``p_t`` are equal, the approximation TRAK's per-example Q makes;
* **metric**: recall, the fraction of examples whose every scored token is the model's argmax.
"""
from __future__ import annotations

import torch

from datalens.tasks.base import Task
from datalens.tasks.classification import margins_from_logits


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """bfloat16 logits (mixed precision) in float32 for the softmax; float64 left as it is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _scored_mean(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` (..., B, L) over each example's scored positions (targets (B, L) > 0): (..., B)."""
    scored = (targets > 0).to(values.dtype)
    return (values * scored).sum(-1) / scored.sum(-1).clamp_min(1)


class LanguageModelTask(Task):
    """See the module docstring."""

    name = "language_model"
    metric_name = "recall"

    def loss(self, outputs, targets):
        logp = torch.log_softmax(_at_least_float32(outputs), -1).gather(-1, targets.expand(outputs.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        return _scored_mean(-logp, targets)

    def output(self, outputs, targets):
        return _scored_mean(margins_from_logits(outputs, targets), targets)

    def answer_probability(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean probability (..., B) the model gives each scored token: for a query, the answer's."""
        p = torch.softmax(_at_least_float32(outputs), -1).gather(-1, targets.expand(outputs.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        return _scored_mean(p, targets)

    def out_to_loss(self, outputs, targets):
        return 1.0 - self.answer_probability(outputs, targets)

    def recalled(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """1.0 where every scored token is the argmax, else 0.0: (..., B)."""
        wrong = (outputs.argmax(-1) != targets) & (targets > 0)
        return (~wrong.any(-1)).float()

    def metric(self, outputs, targets):
        return self.recalled(outputs, targets).mean(-1)

    def embeddings(self, model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The model's own representation of each sequence (B, 1, dim), for embedding similarity."""
        return model.embedding(inputs).unsqueeze(-2)
