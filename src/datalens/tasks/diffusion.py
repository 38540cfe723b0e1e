"""Denoising diffusion models (DDPM, Ho et al. 2020) as a task: the noise-prediction loss for
training, the denoising loss at fixed noise as the measured and attributed output.

Examples are images ``inputs`` x_0 (n, *shape) in [-1, 1] and ``targets`` (n, K, 1 + D), K fixed
draws (u, eps) per example (:mod:`datalens.core.diffusion`): timestep ``t = floor(u T)`` of a
T-step cosine schedule ``alpha_bar`` and noise eps (D,). The forward noises each example at each
of its draws, ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``, and the model
predicts the noise; raw outputs are the predictions (..., B, K, D).

* **loss** (training): the mean over draws and pixels of ``(eps - eps_theta(x_t, t))^2``; during
  training every step draws fresh (u, eps) per example from the model's own generator
  (:meth:`DiffusionTask.draw`), so a model's noise depends only on its seed;
* **output** f, by ``output``: ``loss``, the negated denoising loss at the example's fixed draws
  (the LDS ground truth, D-TRAK's; negated so that, like a margin, higher means the model fits
  the example better), or D-TRAK's alternative ``square_norm``, ``mean_k mean_d eps_theta^2``
  (Zheng et al., 2024, their best); TRAK takes the gradient of the same f for training and
  target examples, and Q = 1 (Georgiev et al., 2023; D-TRAK);
* ``draws`` K' uses K' evenly spaced draws of the K (:func:`~datalens.core.diffusion.spaced_draws`):
  the number of timesteps TRAK's gradients sum over; None uses all of them;
* **metric**: the mean denoising loss over the examples (lower is better).

:func:`sample` runs the DDPM sampler with given noise, and :func:`step_targets` builds the
targets of the Journey paper's step-wise attribution.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from datalens.core.diffusion import cosine_alpha_bar, spaced_draws
from datalens.tasks.base import Task

OUTPUTS = ("loss", "square_norm")


class DiffusionTask(Task):
    """See the module docstring. ``steps`` is T; ``output`` one of :data:`OUTPUTS`."""

    name = "diffusion"
    metric_name = "denoising loss"
    draws_per_step = True

    def __init__(self, steps: int, output: str = "loss", draws: int | None = None):
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r} is not allowed; allowed values: {', '.join(OUTPUTS)}")
        self.steps, self.output_name, self.draws = int(steps), output, draws
        self.alpha_bar = cosine_alpha_bar(self.steps).float()

    def _used(self, targets: torch.Tensor) -> torch.Tensor:
        if self.draws is None:
            return targets
        return targets[..., torch.as_tensor(spaced_draws(targets.shape[-2], self.draws), device=targets.device), :]

    def timesteps(self, u: torch.Tensor) -> torch.Tensor:
        """Integer timesteps t = floor(u T) of fractions u in [0, 1)."""
        return (u * self.steps).long().clamp(0, self.steps - 1)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps for x0 (B, 1, D), t (B, K), eps (B, K, D)."""
        ab = self.alpha_bar.to(eps.device)[t].unsqueeze(-1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def forward(self, model: Callable, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        y = self._used(targets)
        b, k = y.shape[0], y.shape[1]
        t = self.timesteps(y[..., 0])
        xt = self.noised(inputs.reshape(b, 1, -1).to(y.dtype), t, y[..., 1:])
        pred = model(xt.reshape(b * k, *inputs.shape[1:]).to(inputs.dtype), (t.reshape(-1).float() + 0.5) / self.steps)
        return pred.reshape(b, k, -1)

    def draw(self, inputs: torch.Tensor, targets: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Training targets (B, 1, 1 + D) for one step: one fresh (u, eps) per example from ``gen``."""
        b, d = len(inputs), targets.shape[-1] - 1
        u = torch.rand(b, 1, 1, generator=gen)
        return torch.cat([u, torch.randn(b, 1, d, generator=gen)], -1).to(targets.device, targets.dtype)

    def training_targets(self, targets: torch.Tensor) -> torch.Tensor:
        return targets[:, :1]  # a place for one draw per example: every step draws afresh

    def denoising_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over draws and pixels of (eps - prediction)^2: (..., B)."""
        return ((self._used(targets)[..., 1:] - outputs.float()) ** 2).mean((-1, -2))

    def loss(self, outputs, targets):
        return self.denoising_loss(outputs, targets)

    def output(self, outputs, targets):
        if self.output_name == "square_norm":
            return (outputs.float() ** 2).mean((-1, -2))
        return -self.denoising_loss(outputs, targets)

    def out_to_loss(self, outputs, targets):
        return torch.ones(outputs.shape[:-2], device=outputs.device)

    def metric(self, outputs, targets):
        return self.denoising_loss(outputs, targets).mean(-1)


def posterior_step(alpha_bar: torch.Tensor, s: int, xs: torch.Tensor, eps: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step from x_s (B, D) given the predicted noise: x0_hat = clip((x_s -
    sqrt(1 - ab_s) eps) / sqrt(ab_s), -1, 1) and x_{s-1} = the mean of q(x_{s-1} | x_s, x0_hat)
    plus its standard deviation times z (B, D) (none at s = 0, where x0_hat is returned).
    Returns (x_{s-1}, x0_hat)."""
    ab = alpha_bar[s]
    x0 = ((xs - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
    if s == 0:
        return x0, x0
    ab_prev = alpha_bar[s - 1]
    beta = 1 - ab / ab_prev
    mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * xs
    return mean + (beta * (1 - ab_prev) / (1 - ab)).sqrt() * z, x0


@torch.no_grad()
def sample(model: Callable, task: DiffusionTask, noise: torch.Tensor, shape: tuple[int, ...], start: int | None = None,
           x_start: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """DDPM ancestral sampling with x_0 clipping, with all randomness given.

    noise: (G, T, D): ``noise[:, T-1]`` is x_{T-1}, the start, and ``noise[:, s-1]`` the z added
    on the step from s to s-1. ``start`` s and ``x_start`` (G, D) resume from a state x_s of an
    earlier trajectory with the same noise (the counterfactual). ``model(x (G, *shape), t (G,))``.
    Returns ``states`` (G, T, D) (x_s at index s; before ``start`` only), ``x0`` (G, T, D) the
    prediction of x_0 at each step, and ``final`` (G, D)."""
    steps, ab = task.steps, task.alpha_bar.to(noise.device)
    start = steps - 1 if start is None else start
    xs = noise[:, steps - 1] if x_start is None else x_start
    g = len(noise)
    states, x0s = torch.zeros_like(noise), torch.zeros_like(noise)
    for s in range(start, -1, -1):
        states[:, s] = xs
        eps = model(xs.reshape(g, *shape), torch.full((g,), (s + 0.5) / steps, device=noise.device)).reshape(g, -1)
        xs, x0s[:, s] = posterior_step(ab, s, xs, eps, noise[:, s - 1] if s > 0 else torch.zeros_like(xs))
    return {"states": states, "x0": x0s, "final": xs}


def sampling_noise(seed: int, count: int, steps: int, dim: int) -> torch.Tensor:
    """The noise (count, steps, dim) of ``count`` trajectories, from ``seed``."""
    return torch.as_tensor(np.random.default_rng([seed, count, steps, dim]).standard_normal((count, steps, dim), dtype=np.float32))


def step_targets(seed: int, steps: int, step: int, count: int, draws: int, dim: int) -> torch.Tensor:
    """Targets (count, draws, 1 + D) that measure the denoising loss at timestep ``step`` alone,
    with ``draws`` noise draws per example from ``[seed, step]``: the Journey paper's output at
    sampling step ``step`` (its x0 prediction re-noised to ``step``, averaged over noise)."""
    rng = np.random.default_rng([seed, step, count, draws, dim])
    u = np.full((count, draws, 1), (step + 0.5) / steps, np.float32)
    return torch.as_tensor(np.concatenate([u, rng.standard_normal((count, draws, dim), dtype=np.float32)], -1))
