"""ModelDiff (Shah, Park, Ilyas, Madry, ICML 2023): the training-data directions that one
learning algorithm uses and another does not, found by comparing their attributions.

Inputs are two attribution matrices over the same training and target examples, in this
repo's orientation (n_train, n_targets) (datamodel weights or TRAK scores). Per target x:

* theta_x^A, theta_x^B in R^n_train, each scaled to unit norm;
* the residual of A given B, ``r_x = theta_x^A - <theta_x^A, theta_x^B> theta_x^B``: what A's
  prediction rests on that B's does not (orthogonal to theta_x^B);
* PCA over targets of the residuals (rows r_x): each component v in R^n_train is a
  *distinguishing training direction*.

A direction is judged by how much of each algorithm's attribution variance it explains
(rows normalised, columns centred, as the residuals): a real difference explains much
under one algorithm and little under the other. All arithmetic is float64, on any device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def unit_rows(theta: np.ndarray | torch.Tensor, device="cpu") -> torch.Tensor:
    """(n_train, T) attributions -> (T, n_train) float64, each target's row scaled to unit norm
    (a target with no attribution at all stays zero)."""
    t = torch.as_tensor(np.asarray(theta), dtype=torch.float64, device=device).T
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-300)


def residuals(theta_a, theta_b, device="cpu") -> torch.Tensor:
    """(T, n_train): per target, unit theta^A minus its projection on unit theta^B."""
    a, b = unit_rows(theta_a, device), unit_rows(theta_b, device)
    return a - (a * b).sum(1, keepdim=True) * b


def principal_directions(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of ``rows`` (T, n) over its rows (centred): components (k, n) with unit norm, their
    signs fixed so the largest |entry| is positive, and explained-variance ratios (k,)."""
    centred = rows - rows.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = vh[:k]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    var = s ** 2
    return comps * signs, (var[:k] / var.sum().clamp_min(1e-300))


def explained_variance(theta, directions: torch.Tensor, device="cpu") -> torch.Tensor:
    """Fraction of the variance of the row-normalised, column-centred attribution matrix
    (T, n_train) that each unit direction (k, n_train) explains: (k,)."""
    m = unit_rows(theta, device)
    m = m - m.mean(0, keepdim=True)
    return ((m @ directions.T) ** 2).sum(0) / (m * m).sum().clamp_min(1e-300)


@dataclass
class Directions:
    """Distinguishing directions of one residual ("A minus B": what A uses that B does not).

    components: (k, n_train) unit directions; explained: (k,) share of the residuals' variance;
    variance_a, variance_b: (k,) share of each algorithm's attribution variance;
    projections: (T, k) each target's residual projected on each direction.
    """

    components: np.ndarray
    explained: np.ndarray
    variance_a: np.ndarray
    variance_b: np.ndarray
    projections: np.ndarray

    def top_training_examples(self, c: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the ``count`` most positive and most negative training examples of direction c."""
        order = np.argsort(self.components[c])
        return order[::-1][:count], order[:count]

    def top_targets(self, c: int, count: int) -> np.ndarray:
        """The targets whose residual projects most strongly (in absolute value) on direction c."""
        return np.argsort(-np.abs(self.projections[:, c]))[:count]

    @property
    def variance_ratio(self) -> np.ndarray:
        """(k,) variance under A over variance under B: far above 1 for a feature A uses and B does not."""
        return self.variance_a / np.maximum(self.variance_b, 1e-300)


def model_diff(theta_a, theta_b, num_components: int = 5, device="cpu") -> tuple[Directions, Directions]:
    """Distinguishing directions both ways: (A minus B, B minus A). theta_*: (n_train, T)."""
    if np.shape(theta_a) != np.shape(theta_b):
        raise ValueError(f"the attribution matrices differ in shape: {np.shape(theta_a)} vs {np.shape(theta_b)}")
    out = []
    for first, second in ((theta_a, theta_b), (theta_b, theta_a)):
        res = residuals(first, second, device)
        comps, ratio = principal_directions(res, num_components)
        out.append(Directions(
            components=comps.cpu().numpy(), explained=ratio.cpu().numpy(),
            variance_a=explained_variance(theta_a, comps, device).cpu().numpy(),
            variance_b=explained_variance(theta_b, comps, device).cpu().numpy(),
            projections=((res - res.mean(0, keepdim=True)) @ comps.T).cpu().numpy()))
    return out[0], out[1]


def per_target_cosine(theta_a, theta_b) -> np.ndarray:
    """(T,) cosine similarity of each target's attributions under A and B."""
    return (unit_rows(theta_a) * unit_rows(theta_b)).sum(1).numpy()
