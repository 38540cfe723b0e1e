"""Attribution methods behind one interface: each takes the task first and returns scores
shaped (n_train, n_targets), positive when including a training example raises the
target's output f (the task's; the margin for classification).

Gradient conventions (f the task's output, L its loss, dL/df = -Q; for classification
f = margin, L = cross-entropy, Q = 1 - p):
``-grad L_i = Q_i grad f_i`` is the direction in which training on z_i moves the
parameters, and the target side is ``grad f_x``.

* ``grad_dot`` (GAS / TracIn with one checkpoint): tau = <-grad L_i, grad f_x>
* ``grad_cosine``: the same, normalised
* ``tracin``: sum over checkpoints c of lr_c <-grad L_i^c, grad f_x^c>
* ``representation_similarity``: cosine of penultimate-layer features
* ``embedding_similarity``: the cosine of the model's own embeddings (two-tower models: the mean of
  the image-image and text-text cosines, the TRAK paper's CLIP-similarity baseline)
* ``bm25``: lexical retrieval of training texts by a query (fact tracing's classic baseline)
* ``influence_explicit`` / ``influence_cg``: tau = grad f_x^T (H + damping I)^{-1} (-grad L_i),
  H the Hessian of the model's mean training loss on its own subset; explicit inverse
  for few parameters, batched conjugate gradient on Hessian-vector products otherwise
* ``empirical_influence``: mean margin of models trained with i minus without i
  (from the subset models themselves)

Every step streams examples in chunks (:data:`datalens.tasks.gradients.CHUNK` per forward).
* TRAK (:mod:`datalens.attribution.trak`) and datamodels (:mod:`datalens.attribution.datamodels`) fit the same shape.
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from rank_bm25 import BM25Okapi
from torch.utils.data import TensorDataset

from datalens.tasks.base import Task
from datalens.tasks.gradients import CHUNK, out_to_loss, per_example_gradients


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The name and module of the model's last ``nn.Linear`` (its output layer), found by module
    type rather than by parameter order (ResNet-9 ends in a scaling module after it)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to attribute through")
    return linears[-1]


def last_layer_params(model: nn.Module) -> list[str]:
    """Parameter names of the model's last linear layer (weight, and bias when it has one)."""
    name, layer = last_linear(model)
    return [f"{name}.{p}" for p, _ in layer.named_parameters()]


def penultimate_features(model: nn.Module, x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """The inputs to the model's last linear layer, (n, width): its penultimate representation,
    ``chunk`` examples per forward."""
    captured = []
    handle = last_linear(model)[1].register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach().flatten(1)))
    try:
        with torch.no_grad():
            for a in range(0, len(x), chunk):
                model.eval()(x[a:a + chunk])
    finally:
        handle.remove()
    return torch.cat(captured)


GRADIENT_BUDGET = 8 << 30  # bytes of float64 per-example gradients, (n + t) x d, that a baseline may hold


def params_within(model: nn.Module, examples: int, budget: int = GRADIENT_BUDGET) -> tuple[list[str], str]:
    """The parameters whose float64 per-example gradients for ``examples`` examples fit ``budget``
    bytes: every one when all fit, else the most trailing whole tensors that do (the output layer's
    first). Returns (names, a label for figures: "all", or "last L of P tensors (d of D parameters)")."""
    named = [(name, p.numel()) for name, p in model.named_parameters()]
    total = sum(size for _, size in named)
    if examples * total * 8 <= budget:
        return [name for name, _ in named], "all"
    kept, size = [], 0
    for name, numel in reversed(named):
        if examples * (size + numel) * 8 > budget:
            break
        kept.insert(0, name)
        size += numel
    if not kept:
        raise MemoryError(f"per-example gradients of even the last parameter tensor ({named[-1][0]}) for {examples} examples "
                          f"need {examples * named[-1][1] * 8 / 2**30:.1f} GiB as float64, more than the gradient budget of "
                          f"{budget / 2**30:.1f} GiB: attribute fewer targets or training examples")
    return kept, f"last {len(kept)} of {len(named)} tensors ({size:,} of {total:,} parameters)"


def _helpful_grads(task: Task, model, x, y, param_names=None):
    """(-grad L_i) = Q_i grad f_i: (n, d)."""
    g = per_example_gradients(model, x, y, task, param_names=param_names, dtype=torch.float64)
    return out_to_loss(model, x, y, task).double()[:, None] * g


def grad_dot(task: Task, model, x_train, y_train, x_targets, y_targets, param_names=None) -> np.ndarray:
    gt = per_example_gradients(model, x_targets, y_targets, task, param_names=param_names, dtype=torch.float64)
    return (_helpful_grads(task, model, x_train, y_train, param_names) @ gt.T).cpu().numpy()


def grad_cosine(task: Task, model, x_train, y_train, x_targets, y_targets, param_names=None) -> np.ndarray:
    gt = per_example_gradients(model, x_targets, y_targets, task, param_names=param_names, dtype=torch.float64)
    gi = _helpful_grads(task, model, x_train, y_train, param_names)
    return (F.normalize(gi, dim=1) @ F.normalize(gt, dim=1).T).cpu().numpy()


def tracin(task: Task, checkpoints: Sequence[nn.Module], lrs: Sequence[float], x_train, y_train, x_targets, y_targets,
           param_names=None) -> np.ndarray:
    if len(checkpoints) != len(lrs):
        raise ValueError(f"{len(checkpoints)} checkpoints but {len(lrs)} learning rates")
    return sum(lr * grad_dot(task, m, x_train, y_train, x_targets, y_targets, param_names) for m, lr in zip(checkpoints, lrs))


def representation_similarity(model: nn.Module, x_train, x_targets) -> np.ndarray:
    """Cosine similarity of penultimate features (the inputs to the last linear layer)."""
    a, b = penultimate_features(model, x_train).double(), penultimate_features(model, x_targets).double()
    return (F.normalize(a, dim=1) @ F.normalize(b, dim=1).T).cpu().numpy()


def embedding_similarity(task: Task, model: nn.Module, x_train, y_train, x_targets, y_targets, chunk: int = CHUNK) -> np.ndarray:
    """(n, t): the cosine similarity of the model's own embeddings of each training example and
    target (:meth:`Task.embeddings`, (B, E, dim)), averaged over the E embeddings (a two-tower
    model's image and text: the TRAK paper's CLIP-similarity baseline; a language model's
    pooled states), ``chunk`` examples per forward."""
    @torch.no_grad()
    def unit(x, y):
        return torch.cat([F.normalize(task.embeddings(model.eval(), x[a:a + chunk], y[a:a + chunk]).double(), dim=-1)
                          for a in range(0, len(x), chunk)])

    a, b = unit(x_train, y_train), unit(x_targets, y_targets)
    return (torch.einsum("ied,jed->ij", a, b) / a.shape[1]).cpu().numpy()


def bm25(train_texts: Sequence[str], query_texts: Sequence[str]) -> np.ndarray:
    """(n, t): Okapi BM25 (Robertson and Zaragoza, 2009; ``rank_bm25`` at its defaults, k1 = 1.5,
    b = 0.75) of each training text for each query, both split on whitespace: lexical overlap,
    blind to any model."""
    index = BM25Okapi([t.split() for t in train_texts])
    return np.stack([index.get_scores(q.split()) for q in query_texts], 1)


def _training_loss_fn(task: Task, model, x, y, names):
    params = dict(model.named_parameters())
    frozen = {n: p.detach() for n, p in params.items() if n not in names}
    frozen.update(dict(model.named_buffers()))
    shapes = [params[n].shape for n in names]
    sizes = [s.numel() for s in shapes]

    def loss(flat):
        p = {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return task.mean_loss(task.forward(lambda *a: functional_call(model, {**frozen, **p}, a), x, y), y)

    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    return loss, flat0


def influence_explicit(task: Task, model, x_train, y_train, train_mask, x_targets, y_targets, damping=1e-3, param_names=None):
    """Influence with an explicit damped Hessian over ``param_names`` (all by default; keep d small).
    ``damping`` may be a list: then {damping: scores}, with the Hessian formed once.
    Works on a float64 copy: the caller's model is left as it is."""
    model = copy.deepcopy(model).eval().double()
    names = list(param_names) if param_names is not None else [n for n, _ in model.named_parameters()]
    mask = torch.as_tensor(np.asarray(train_mask, bool), device=x_train.device)
    loss, flat0 = _training_loss_fn(task, model, x_train[mask].double(), y_train[mask], names)
    hess = torch.func.hessian(loss)(flat0)
    gi = _helpful_grads(task, model, x_train.double(), y_train, names)
    gt = per_example_gradients(model, x_targets.double(), y_targets, task, param_names=names, dtype=torch.float64)
    eye = torch.eye(len(flat0), dtype=hess.dtype, device=hess.device)
    out = {d: (gi @ torch.linalg.solve(hess + d * eye, gt.T)).cpu().numpy() for d in np.atleast_1d(damping).tolist()}
    return out if isinstance(damping, (list, tuple)) else out[float(damping)]


def influence_cg(task: Task, model, x_train, y_train, train_mask, x_targets, y_targets, damping=1e-3, param_names=None,
                 iters: int = 100, tol: float = 1e-8):
    """Influence by conjugate gradient on (H + damping I) v = grad f_x, all targets at once,
    with Hessian-vector products (forward-over-reverse); never forms H. CG needs
    H + damping I positive definite: a clear error says when damping is too small.
    Works on a float64 copy: the caller's model is left as it is.

    ``damping`` may be a list: then {damping: scores} for every damping whose system stayed
    positive definite, all from one Krylov sequence (:func:`_multishift_cg`), so a grid of
    dampings costs the Hessian-vector products of one."""
    model = copy.deepcopy(model).eval().double()
    names = list(param_names) if param_names is not None else [n for n, _ in model.named_parameters()]
    mask = torch.as_tensor(np.asarray(train_mask, bool), device=x_train.device)
    loss, flat0 = _training_loss_fn(task, model, x_train[mask].double(), y_train[mask], names)
    hvp = vmap(lambda u: jvp(grad(loss), (flat0,), (u,))[1], in_dims=1, out_dims=1)
    b = per_example_gradients(model, x_targets.double(), y_targets, task, param_names=names, dtype=torch.float64).T
    solutions = _multishift_cg(hvp, b, sorted({float(d) for d in np.atleast_1d(damping)}), iters, tol)
    if not isinstance(damping, (list, tuple)) and not solutions:
        raise ValueError(f"H + damping I is not positive definite (the model's loss is non-convex here); raise damping above {damping}")
    gi = _helpful_grads(task, model, x_train.double(), y_train, names)
    out = {d: (gi @ v).cpu().numpy() for d, v in solutions.items()}
    return out if isinstance(damping, (list, tuple)) else out[float(damping)]


def _multishift_cg(hvp, b: torch.Tensor, shifts: Sequence[float], iters: int, tol: float) -> dict[float, torch.Tensor]:
    """CG on (A + s I) x = b for every shift s at once (Jegerlehner, 1996; Frommer, 2003): the
    Krylov space of A + s I does not depend on s, so one CG run on the smallest shift (the seed)
    gives every other shift's CG iterates from scalar recurrences, at no extra products with A.

    hvp: v (d, t) -> A v; b: (d, t), one system per column. Each shift stops on its own when its
    largest residual norm is at most ``tol`` times the largest ``||b||`` (as a CG run of its own
    would), or after ``iters`` steps. A shift whose system shows non-positive curvature in a
    column is dropped with every shift below it (as a run from the largest shift down stops at the
    first indefinite system); when that is the seed, the next shift carries on as the seed from
    its own iterate, so no product is spent twice. Returns {shift: x (d, t)} for the shifts kept.
    """
    shifts = sorted(shifts)
    ones = torch.ones(b.shape[1], dtype=b.dtype, device=b.device)
    # per shift: iterate x, direction p, residual scale zeta (its residual is zeta r, r the seed's),
    # the previous zeta, and its previous alpha and beta (alpha_{-1} = 1, beta_{-1} = 0)
    state = {s: {"x": torch.zeros_like(b), "p": b.clone(), "zeta": ones, "zeta_prev": ones, "alpha": ones, "beta": 0 * ones}
             for s in shifts}
    r, bound, running, first, step = b.clone(), tol * float(b.norm(dim=0).max()), set(shifts), 0, 0
    while step < iters:  # a product that finds the seed indefinite is not a step of the shifts above it
        seed = shifts[first]
        sd = state[seed]
        ap = hvp(sd["p"]) + seed * sd["p"]
        curvature = (sd["p"] * ap).sum(0)
        drop = seed if bool((curvature <= 0).any()) else None
        if drop is None:
            rs = (r * r).sum(0)
            alpha = rs / curvature
            r_next = r - alpha * ap
            rs_next = (r_next * r_next).sum(0)
            beta = rs_next / rs.clamp_min(1e-300)
            steps = {seed: (ones, alpha, beta)}
            for s in shifts[first + 1:]:  # the shifted systems' own alpha and beta follow from the seed's
                z, zp = state[s]["zeta"], state[s]["zeta_prev"]
                z_next = z * zp * sd["alpha"] / (alpha * sd["beta"] * (zp - z) + zp * sd["alpha"] * (1 + (s - seed) * alpha))
                steps[s] = (z_next, alpha * z_next / z, beta * (z_next / z) ** 2)
                if bool((steps[s][1] <= 0).any()):  # non-positive curvature of its own
                    drop = s
        if drop is not None:  # it and every shift below it go; the next carries on as the seed from where it is
            first = shifts.index(drop) + 1
            if first == len(shifts):
                return {}
            new = state[shifts[first]]
            r = new["zeta"] * r
            for s in shifts[first + 1:]:
                state[s]["zeta"], state[s]["zeta_prev"] = state[s]["zeta"] / new["zeta"], state[s]["zeta_prev"] / new["zeta_prev"]
            new["zeta"], new["zeta_prev"] = ones, ones
            running &= set(shifts[first:])
            continue
        for s, (z_next, alpha_s, beta_s) in steps.items():
            st = state[s]
            if s in running:
                st["x"] += alpha_s * st["p"]
                if float((z_next.abs() * rs_next.sqrt()).max()) <= bound:
                    running.discard(s)
            st["p"] = z_next * r_next + beta_s * st["p"]
            st["zeta_prev"], st["zeta"], st["alpha"], st["beta"] = st["zeta"], z_next, alpha_s, beta_s
        r, step = r_next, step + 1
        if not running:
            break
    return {s: state[s]["x"] for s in shifts[first:]}


def empirical_influence(masks: np.ndarray, margins: np.ndarray) -> np.ndarray:
    """Mean margin with i minus without i over subset models: masks (m, n), margins (m, t) -> (n, t)."""
    masks = np.asarray(masks, dtype=np.float64)
    n_in = masks.sum(0)
    n_out = len(masks) - n_in
    if (n_in == 0).any() or (n_out == 0).any():
        raise ValueError("every training example must be both in and out of some subset models")
    mean_in = masks.T @ margins / n_in[:, None]
    mean_out = (1 - masks).T @ margins / n_out[:, None]
    return mean_in - mean_out



def ekfac_influence(task: Task, model: nn.Module, x_train, y_train, x_targets, y_targets, dampings: Sequence[float],
                    batch_size: int = 512, seed: int = 0) -> dict[float, np.ndarray]:
    """Influence functions with an EK-FAC Hessian (George et al., 2018; Grosse et al., 2023), by
    kronfluence: tau[i, x] = grad f_x^T (G + damping I)^{-1} (-grad L_i), G the EK-FAC
    approximation of the Gauss-Newton Hessian of the mean training loss over
    ``(x_train, y_train)``, fitted once. Returns {damping: (n_train, t)} (same sign convention
    as :func:`influence_explicit`). The Fisher's sampled labels come from ``seed``, so the scores
    are reproducible. kronfluence is an optional dependency (``make venv`` installs it); the
    caller's model is left as it is.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KronfluenceTask

    class OutputTask(KronfluenceTask):  # our task, in kronfluence's terms
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            outputs = task.forward(model, x, y)
            if sample:  # the true Fisher: targets drawn from the model's own predictions
                with torch.no_grad():
                    y = task.sample_targets(outputs)
            return task.loss(outputs, y).sum()

        def compute_measurement(self, batch, model):
            x, y = batch
            return task.output(task.forward(model, x, y), y).sum()

    kf_task = OutputTask()
    tracked = prepare_model(copy.deepcopy(model).float().eval(), kf_task)
    inputs = lambda x: (x.float() if x.is_floating_point() else x).cpu()  # noqa: E731  (token ids stay integers)
    train = TensorDataset(inputs(x_train), y_train.cpu())
    query = TensorDataset(inputs(x_targets), y_targets.cpu())
    out = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", FutureWarning)  # kronfluence's torch.cuda.amp calls, on every run
        torch.manual_seed(seed)  # the labels drawn for the true Fisher
        analyzer = Analyzer("datalens", tracked, kf_task, cpu=x_train.device.type != "cuda", disable_tqdm=True, output_dir=tmp)
        analyzer.fit_all_factors("ekfac", train, per_device_batch_size=batch_size,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        for d in dampings:
            name = f"scores_{len(out)}"
            analyzer.compute_pairwise_scores(name, "ekfac", query, train, per_device_query_batch_size=batch_size,
                                             per_device_train_batch_size=batch_size,
                                             score_args=ScoreArguments(damping_factor=float(d)), overwrite_output_dir=True)
            # kronfluence scores grad f_x^T G^{-1} grad L_i (query x train); training on z_i moves along -grad L_i
            out[float(d)] = -analyzer.load_pairwise_scores(name)["all_modules"].double().T.cpu().numpy()
    return out
