"""Params: loading ``params.yaml``, validating every key, and giving each DVC stage
exactly the dotted keys it declares in ``dvc.yaml``.

A notebook never reads ``params.yaml`` directly: it calls :func:`stage_params`,
which returns only the keys its stage lists under ``params:``. A notebook that
reads an undeclared key therefore fails, so ``dvc.yaml`` cannot drift from the
code.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import yaml


class ParamError(ValueError):
    """A param is missing or has a value outside its allowed set."""


def repo_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: cwd) holding ``dvc.yaml``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in [here, *here.parents]:
        if (folder / "dvc.yaml").exists():
            return folder
    raise FileNotFoundError(f"no dvc.yaml at or above {here}: run from inside the datalens repo")


def get_dotted(tree: dict, key: str) -> Any:
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamError(f"param '{key}' is missing from params.yaml")
        node = node[part]
    return node


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


# --- validators -------------------------------------------------------------

def _choice(*allowed: str) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if v not in allowed:
            raise ParamError(f"{key}={v!r} is not allowed; allowed values: {', '.join(allowed)}")
    return check


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ParamError(f"{key}={v!r} is not allowed; it must be an integer {rng}")
    return check


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v <= hi
        if not ok:
            left = "(" if lo_open else "["
            raise ParamError(f"{key}={v!r} is not allowed; it must be a number in {left}{lo}, {hi if hi is not None else 'inf'}]")
    return check


def _int_list(lo: int = 1) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) or x < lo for x in v):
            raise ParamError(f"{key}={v!r} is not allowed; it must be a non-empty list of integers >= {lo}")
    return check


def _float_list(lo: float = 0.0) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if not isinstance(v, list) or not v or any(not isinstance(x, (int, float)) or isinstance(x, bool) or x <= lo for x in v):
            raise ParamError(f"{key}={v!r} is not allowed; it must be a non-empty list of numbers > {lo}")
    return check


def _str(key: str, v: Any) -> None:
    if not isinstance(v, str) or not v:
        raise ParamError(f"{key}={v!r} is not allowed; it must be a non-empty string")


def _bool(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ParamError(f"{key}={v!r} is not allowed; it must be true or false")


def _dataset(key: str, v: Any) -> None:
    from datalens.data import DATASETS
    _choice(*DATASETS)(key, v)


def _model(key: str, v: Any) -> None:
    from datalens.models import MODELS
    _choice(*MODELS)(key, v)


_TRAIN = {
    "alpha": _float(0.0, 1.0, lo_open=True),
    "epochs": _int(1),
    "lr": _float(0.0, None, lo_open=True),
    "optimizer": _choice("adam", "sgd"),
    "momentum": _float(0.0, 1.0),
    "weight_decay": _float(0.0),
    "batch_size": _int(0),
    "label_smoothing": _float(0.0, 1.0),
    "schedule": _choice("constant", "triangular"),
    "peak_epoch": _float(0.0),
    "augment": _bool,
    "precision": _choice("float32", "bfloat16"),
}

SCHEMA: dict[str, Callable[[str, Any], None]] = {
    "data.dataset": _dataset,
    "data.root": _str,
    "model.name": _model,
    "model.hidden": _int_list(1),
    "model.width": _int(1),
    "device": _choice("auto", "cpu", "cuda"),
    **{f"train.{k}": v for k, v in _TRAIN.items()},
    "train.seed": _int(0),
    "train.num_models": _int(1),
    "train.block_size": _int(1),
    "train.stack_size": _int(1),
    "train.num_checkpoints": _int(0),
    "train.store": _str,
    "execution.backend": _choice("local", "ray"),
    "execution.address": _str,
    "execution.num_cpus_per_task": _float(0.0, None, lo_open=True),
    "execution.num_gpus_per_task": _float(0.0),
    "execution.max_retries": _int(0),
    "evaluation.num_masks": _int(1),
    "evaluation.repeats": _int(1),
    "evaluation.seed": _int(0),
    "evaluation.store": _str,
    "datamodels.num_lambdas": _int(2),
    "datamodels.eps": _float(0.0, 1.0, lo_open=True),
    "datamodels.val_fraction": _float(0.0, 0.5, lo_open=True),
    "datamodels.max_iter": _int(1),
    "datamodels.tol": _float(0.0, None, lo_open=True),
    "datamodels.model_counts": _int_list(2),
    "counterfactuals.num_targets": _int(1),
    "counterfactuals.ks": _int_list(1),
    "counterfactuals.num_retrains": _int(1),
    "counterfactuals.seed": _int(0),
    "trak.num_models": _int_list(1),
    "trak.proj_dims": _int_list(1),
    "trak.proj_type": _choice("rademacher", "gaussian"),
    "trak.ridge_grid": _float_list(0.0),
    "trak.num_val_models": _int(1),
    "trak.store": _str,
    "attribution.ensemble_sizes": _int_list(1),
    "attribution.dampings": _float_list(0.0),
    "attribution.tracin_epochs": _int_list(1),
}


def validate(flat: dict[str, Any]) -> None:
    """Check every dotted key in ``flat`` against :data:`SCHEMA`; raise :class:`ParamError`."""
    for key, value in flat.items():
        if key not in SCHEMA:
            raise ParamError(f"unknown param '{key}'; known params: {', '.join(sorted(SCHEMA))}")
        SCHEMA[key](key, value)


def load_params(path: str | Path) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def declared_params(stage: str, root: Path) -> list[str]:
    """The dotted keys that ``dvc.yaml`` lists under ``stages.<stage>.params``."""
    with open(root / "dvc.yaml") as fh:
        stages = yaml.safe_load(fh)["stages"]
    if stage not in stages:
        raise ParamError(f"no stage '{stage}' in dvc.yaml; stages: {', '.join(stages)}")
    keys: list[str] = []
    for entry in stages[stage].get("params", []):
        keys.extend([entry] if isinstance(entry, str) else [k for v in entry.values() for k in v])
    return keys


def stage_params(stage: str, params_path: str | Path = "params.yaml", overrides: dict | None = None) -> dict:
    """The params of one stage as a nested dict: exactly the keys ``dvc.yaml`` declares,
    with ``overrides`` (dotted key -> value, also restricted to declared keys) applied,
    all validated before any work starts."""
    params_path = Path(params_path)
    root = repo_root(params_path.parent if params_path.is_absolute() else Path.cwd())
    if not params_path.is_absolute():
        params_path = root / params_path if not params_path.exists() else params_path
    full = load_params(params_path)
    keys = declared_params(stage, root)
    flat: dict[str, Any] = {}
    for k in keys:
        value = get_dotted(full, k)
        # A whole section (e.g. ``model``) is declared when the stage reads all of it.
        flat.update({f"{k}.{sub}": v for sub, v in value.items()} if isinstance(value, dict) else {k: value})
    for k, v in (overrides or {}).items():
        if k not in flat:
            raise ParamError(f"override '{k}' is not a param of stage '{stage}'; its params: {', '.join(keys)}")
        flat[k] = v
    validate(flat)
    tree: dict = {}
    for k, v in flat.items():
        set_dotted(tree, k, copy.deepcopy(v))
    tree["_root"] = str(root)
    return tree
