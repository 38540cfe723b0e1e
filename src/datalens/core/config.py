"""Params: loading ``params.yaml``, validating every key, and giving each DVC stage
exactly the dotted keys it declares in ``dvc.yaml``.

A notebook never reads ``params.yaml`` directly: it calls :func:`stage_params`,
which returns only the keys its stage lists under ``params:``. A notebook that
reads an undeclared key therefore fails, so ``dvc.yaml`` cannot drift from the
code.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, create_model, model_validator

from datalens.core.data import DATASETS, dataset_sizes, missing_data, resolve_callable
from datalens.core.execution import ray_reachable
from datalens.core.memory import memory_problems
from datalens.core.models import MODELS


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


def resolve_location(p: dict, location: str) -> str:
    """A store or data location from params: a URL (``s3://``, ``file://``, ``memory://``) or an
    absolute path as it is; a relative path joined to the repo root the params came with."""
    if "://" in location or location.startswith("/"):
        return location
    return f"{p.get('_root', '.')}/{location}"


def shown_location(p: dict, location: str) -> str:
    """A location as a person should read it: relative to the repo root when it lies inside it
    (so metrics and notebooks do not differ between checkouts), else as it is."""
    root = str(Path(p.get("_root", ".")).resolve())
    path = location[len("file://"):] if location.startswith("file://") else location
    if "://" in path or not Path(path).resolve().is_relative_to(root):
        return location
    return str(Path(path).resolve().relative_to(root))


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


# --- validators -------------------------------------------------------------
# Each param's type is a pydantic v2 schema (strict: no coercion of "1" or true to numbers);
# a failure becomes one line naming the key, the value and what is allowed. Values are
# validated, never replaced, so a store's identity sees exactly what params.yaml says.

class Param:
    """One param's check: a pydantic schema and, for the message, what it allows."""

    def __init__(self, schema: Any, allowed: str):
        self.adapter, self.allowed = TypeAdapter(schema), allowed

    def __call__(self, key: str, v: Any) -> None:
        try:
            self.adapter.validate_python(v)
        except ValidationError:
            raise ParamError(f"{key}={v!r} is not allowed; {self.allowed}") from None


def _bounds(lo, hi, lo_open=False, hi_open=False) -> dict:
    return {k: v for k, v in (("gt" if lo_open else "ge", lo), ("lt" if hi_open else "le", hi)) if v is not None}


def _choice(*allowed: str) -> Param:
    return Param(Literal[allowed], f"allowed values: {', '.join(allowed)}")


def _int(lo: int | None = None, hi: int | None = None) -> Param:
    return Param(Annotated[int, Field(strict=True, **_bounds(lo, hi))],
                 f"it must be an integer {f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'}")


_FINITE = {"strict": True, "allow_inf_nan": False}


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Param:
    left, right = "(" if lo_open else "[", ")" if hi_open or hi is None else "]"
    return Param(Annotated[float, Field(**_FINITE, **_bounds(lo, hi, lo_open, hi_open))],
                 f"it must be a finite number in {left}{lo}, {hi if hi is not None else 'inf'}{right}")


def _int_list(lo: int = 1) -> Param:
    return Param(Annotated[list[Annotated[int, Field(strict=True, ge=lo)]], Field(strict=True, min_length=1)],
                 f"it must be a non-empty list of integers >= {lo}")


def _float_list(lo: float = 0.0) -> Param:
    return Param(Annotated[list[Annotated[float, Field(**_FINITE, gt=lo)]], Field(strict=True, min_length=1)],
                 f"it must be a non-empty list of finite numbers > {lo}")


_str = Param(Annotated[str, Field(strict=True, min_length=1)], "it must be a non-empty string")
_bool = Param(Annotated[bool, Field(strict=True)], "it must be true or false")


def _fields(**checks: Param) -> Callable[[str, Any], None]:
    """A mapping with exactly these fields (a pydantic model that forbids others), each field's
    failure named as ``key.field``."""
    model = create_model("Fields", __config__=ConfigDict(extra="forbid", strict=True),
                         **{name: (Any, ...) for name in checks})

    def check(key: str, v: Any) -> None:
        try:
            model.model_validate(v)
        except ValidationError:
            raise ParamError(f"{key}={v!r} is not allowed; it must be a mapping with the fields {', '.join(checks)}") from None
        for name, field_check in checks.items():
            field_check(f"{key}.{name}", v[name])
    return check


_REGION = {"size": _int(1), "row": _int(0), "col": _int(0)}


def _overrides(key: str, v: Any) -> None:
    """An algorithm as overrides of the base run: dotted model.* / train.* keys (each checked as
    that param) and data.blank (a region)."""
    if not isinstance(v, dict):
        raise ParamError(f"{key}={v!r} is not allowed; it must be a mapping of dotted keys (model.*, train.*, data.blank)")
    for k, value in v.items():
        if k == "data.blank":
            _fields(**_REGION)(f"{key}.{k}", value)
        elif k.split(".")[0] in ("model", "train") and k in SCHEMA:
            SCHEMA[k](f"{key}.{k}", value)
        else:
            raise ParamError(f"{key}: override '{k}' is not allowed; allowed keys: data.blank, "
                             f"{', '.join(sorted(x for x in SCHEMA if x.split('.')[0] in ('model', 'train')))}")


def _name_or_import_path(*registered: str) -> Callable[[str, Any], None]:
    """A registered name, or an import path of the user's own function (``package.module:function``
    or ``path/to/file.py:function``); whether the path resolves is checked in :func:`validate`."""
    def check(key: str, v: Any) -> None:
        if v in registered:
            return
        module, _, attr = v.partition(":") if isinstance(v, str) else ("", "", "")
        if not module or not attr or not attr.isidentifier():
            raise ParamError(f"{key}={v!r} is not allowed; allowed values: {', '.join(registered)}, or an import path "
                             "'package.module:function' or 'path/to/file.py:function'")
    return check


UNLEARNING_METHODS = ("gd", "ga", "ascent_descent", "scrub", "om", "dmm")  # the fine-tuned ones (datalens.applications.unlearning)


def _forget_sets(key: str, v: Any) -> None:
    """A list of forget sets: ``{name, kind: random, size}`` or ``{name, kind: component,
    component, size}``, each optionally ``select: true``; names unique; at least one set to
    report and one to select on."""
    if not isinstance(v, list) or not v:
        raise ParamError(f"{key}={v!r} is not allowed; it must be a non-empty list of forget sets")
    for i, spec in enumerate(v):
        where = f"{key}[{i}]"
        if not isinstance(spec, dict):
            raise ParamError(f"{where}={spec!r} is not allowed; it must be a mapping")
        kind = spec.get("kind")
        _choice("random", "component")(f"{where}.kind", kind)
        fields = {"name": _str, "kind": _str, "size": _int(1), "select": _bool}
        if kind == "component":
            fields["component"] = _int(1)
        extra, missing = set(spec) - set(fields), set(fields) - set(spec) - {"select"}
        if extra or missing:
            raise ParamError(f"{where}={spec!r} is not allowed; a {kind} forget set has the fields "
                             f"{', '.join(fields)} (select optional)")
        for name, check in fields.items():
            if name in spec:
                check(f"{where}.{name}", spec[name])
    names = [s["name"] for s in v]
    if len(set(names)) != len(names):
        raise ParamError(f"{key}: forget set names must be unique, got {names}")
    roles = {bool(s.get("select", False)) for s in v}
    if roles != {True, False}:
        raise ParamError(f"{key} needs at least one set to report and one with select: true (for choosing hyperparameters)")


def _lrs(key: str, v: Any) -> None:
    """Learning rates to sweep for each fine-tuned unlearning method."""
    if not isinstance(v, dict) or set(v) != set(UNLEARNING_METHODS):
        raise ParamError(f"{key}={v!r} is not allowed; it must map each of {', '.join(UNLEARNING_METHODS)} to a list of learning rates")
    for method, grid in v.items():
        _float_list(0.0)(f"{key}.{method}", grid)


_TRAIN = {
    "alpha": _float(0.0, 1.0, lo_open=True),
    "epochs": _int(1),
    "lr": _float(0.0, None, lo_open=True),
    "optimizer": _choice("adam", "sgd"),
    "momentum": _float(0.0, 1.0, hi_open=True),
    "weight_decay": _float(0.0),
    "batch_size": _int(0),
    "label_smoothing": _float(0.0, 1.0, hi_open=True),
    "schedule": _choice("constant", "triangular"),
    "peak_epoch": _float(0.0),
    "augment": _bool,
    "precision": _choice("float32", "bfloat16"),
}

MIN_RANKED = 5  # models in a validation or evaluation set: fewer cannot rank hyperparameters by Spearman

SCHEMA: dict[str, Callable[[str, Any], None]] = {
    "data.dataset": _name_or_import_path(*DATASETS),
    "data.root": _str,
    "model.name": _name_or_import_path(*MODELS),
    "model.hidden": _int_list(1),
    "model.width": _int(1),
    "device": _choice("auto", "cpu", "cuda"),
    **{f"train.{k}": v for k, v in _TRAIN.items()},
    "train.seed": _int(0),
    "train.num_models": _int(1),
    "train.block_size": _int(1),
    "train.stack_size": _int(1),
    "train.num_checkpoints": _int(0),
    "train.record_logits": _bool,
    "train.store": _str,
    "execution.backend": _choice("local", "ray"),
    "execution.address": _str,
    "execution.num_cpus_per_task": _float(0.0, None, lo_open=True),
    "execution.num_gpus_per_task": _float(0.0),
    "execution.max_retries": _int(0),
    "evaluation.num_masks": _int(MIN_RANKED),
    "evaluation.repeats": _int(1),
    "evaluation.seed": _int(0),
    "evaluation.store": _str,
    "datamodels.num_lambdas": _int(2),
    "datamodels.eps": _float(0.0, 1.0, lo_open=True, hi_open=True),
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
    "trak.store": _str,
    "attribution.ensemble_sizes": _int_list(1),
    "attribution.dampings": _float_list(0.0),
    "attribution.tracin_epochs": _int_list(1),
    "attribution.selection_models": _int(MIN_RANKED),
    "attribution.ekfac_dampings": _float_list(0.0),
    "attribution.num_targets": _int(0),
    "modeldiff.attribution": _choice("datamodels", "trak"),
    "modeldiff.num_models": _int(20),
    "modeldiff.num_checkpoints": _int(2),
    "modeldiff.num_components": _int(1),
    "modeldiff.null_permutations": _int(1),
    "modeldiff.patch": _fields(label=_int(0), count=_int(1), test_count=_int(0), size=_int(1), row=_int(0), col=_int(0),
                               value=_float(), seed=_int(0)),
    "modeldiff.planted_a": _overrides,
    "modeldiff.planted_b": _overrides,
    "modeldiff.natural_a": _overrides,
    "modeldiff.natural_b": _overrides,
    "modeldiff.patch_intensities": _float_list(0.0),
    "modeldiff.blend_intensities": _float_list(0.0),
    "modeldiff.trak_models": _int(1),
    "modeldiff.trak_proj_dim": _int(1),
    "modeldiff.trak_ridge": _float(0.0, None, lo_open=True),
    "modeldiff.store_dir": _str,
    "unlearning.num_models": _int(MIN_RANKED),
    "unlearning.forget_sets": _forget_sets,
    "unlearning.budgets": _float_list(0.0),
    "unlearning.lrs": _lrs,
    "unlearning.max_grid_extensions": _int(0),
    "unlearning.max_budget_extensions": _int(0),
    "unlearning.dm_scales": _float_list(0.0),
    "unlearning.datamodel_alphas": Param(Annotated[list[Annotated[float, Field(**_FINITE, gt=0.0, lt=1.0)]], Field(strict=True, min_length=1)],
                                         "it must be a non-empty list of inclusion probabilities in (0, 1)"),
    "unlearning.batch_size": _int(1),
    "unlearning.momentum": _float(0.0, 1.0, hi_open=True),
    "unlearning.lr_decay": _float(0.0, 1.0, lo_open=True),
    "unlearning.retain_ratio": _float(0.0),
    "unlearning.temperature": _float(0.0, None, lo_open=True),
    "unlearning.om_oracles": _int(1),
    "unlearning.ridge_grid": _float_list(0.0),
    "unlearning.val_fraction": _float(0.0, 0.5, lo_open=True),
    "unlearning.lasso_targets": _int(0),
    "unlearning.klom": _fields(bins=_int(2), clip=_float(0.0, None, lo_open=True), floor=_float(0.0, 1.0, lo_open=True, hi_open=True),
                               direction=_choice("unlearned_oracle", "oracle_unlearned")),
    "unlearning.seed": _int(0),
    "unlearning.store_dir": _str,
    "denoising.reference_store": _str,
    "denoising.num_generated": _int(1),
    "denoising.sampling_seed": _int(0),
    "denoising.outputs": Param(Annotated[list[Literal["loss", "square_norm"]], Field(strict=True, min_length=1)],
                               "it must be a non-empty list of: loss, square_norm"),
    "denoising.timesteps": _int_list(1),
    "denoising.trajectories": _int(1),
    "denoising.steps": _int_list(0),
    "counterfactuals.steps": _int_list(0),
    "denoising.step_draws": _int(1),
    "denoising.top_k": _int(1),
}


# Sections that are a run of their own: the same params as the top level, under a prefix (``clip.train.epochs``),
# each checked as its top-level key and by the same rules; ``device`` and ``execution`` stay shared.
SECTIONS: dict[str, tuple[str, ...]] = {
    "clip": ("data", "model", "train", "evaluation", "trak", "attribution", "datamodels", "counterfactuals"),
    "fact_tracing": ("data", "model", "train", "evaluation", "trak", "attribution", "datamodels", "counterfactuals"),
    "text_classification": ("data", "model", "train", "evaluation", "trak", "attribution", "datamodels"),
    "diffusion": ("data", "model", "train", "evaluation", "trak", "attribution", "datamodels", "counterfactuals", "denoising"),
}


def section_params(p: dict, section: str) -> dict:
    """A :data:`SECTIONS` section of stage params ``p`` as a run's params: its own data, model,
    train, ... beside the shared ``device``, ``execution`` and repo root."""
    return {**p[section], "device": p["device"], "execution": p["execution"], "_root": p["_root"]}


def _own_model(flat: dict[str, Any]) -> bool:
    return ":" in str(flat.get("model.name", ""))


def problems(flat: dict[str, Any], root: str | Path = ".", environment: bool = False, prefix: str = "") -> list[str]:
    """Every problem with the dotted params ``flat``, one line each: each key against
    :data:`SCHEMA`, import paths of your own data and model (resolved against the repo ``root``),
    the rules that tie keys together (:class:`ParamRules`, on the keys that passed their own
    check) and, with ``environment``, what this machine must offer (:func:`environment_problems`).
    A model given by import path takes any other ``model.*`` keys as its keyword arguments.
    The keys of a :data:`SECTIONS` section are checked the same way, named with their prefix."""
    found, bad = [], set()
    sections = {} if prefix else {s: {k[len(s) + 1:]: v for k, v in flat.items() if k.startswith(s + ".")} for s in SECTIONS}
    for key, value in flat.items():
        if key.split(".")[0] in sections or (prefix and key == "device"):  # a section's own pass; the shared device, checked above
            continue
        try:
            if key not in SCHEMA:
                if key.startswith("model.") and _own_model(flat):
                    continue
                known = sorted(k for k in SCHEMA if not prefix or k.split(".")[0] in SECTIONS[prefix[:-1]])
                raise ParamError(f"unknown param '{prefix}{key}'; known params: {', '.join(prefix + k for k in known)}")
            if prefix and key.split(".")[0] not in SECTIONS[prefix[:-1]]:
                raise ParamError(f"param '{prefix}{key}' is not allowed in section '{prefix[:-1]}'; its sections: "
                                 f"{', '.join(SECTIONS[prefix[:-1]])}")
            SCHEMA[key](prefix + key, value)
        except ParamError as exc:
            found.append(str(exc))
            bad.add(key)
    for key, registered in (("data.dataset", DATASETS), ("model.name", MODELS)):
        if key in flat and key not in bad and flat[key] not in registered:
            try:
                resolve_callable(flat[key], prefix + key, root)
            except ValueError as exc:
                found.append(str(exc))
                bad.add(key)
    good = {k: v for k, v in flat.items() if k not in bad and k.split(".")[0] not in sections}
    rules: list[str] = []
    ParamRules.model_validate(good, context={"root": root, "problems": rules, "prefix": prefix})
    found += rules
    if environment:
        found += environment_problems(good, root, prefix)
    for section, sub in sections.items():
        if sub:  # a section runs on the shared device
            found += problems({**sub, **({"device": flat["device"]} if "device" in flat else {})}, root, environment, section + ".")
    return found


def validate(flat: dict[str, Any], root: str | Path = ".", environment: bool = False) -> None:
    """Raise :class:`ParamError` listing every one of :func:`problems`, one line each."""
    found = problems(flat, root, environment)
    if found:
        raise ParamError("\n".join(found))


class ParamRules(BaseModel):
    """The rules that tie params together, as pydantic validators over the flat params (dotted
    keys). A stage sees only the keys it declares, so each rule applies when all its keys are
    present. Validate with ``context={"root": repo root, "problems": []}`` (a dataset's sizes come
    from the data): every broken rule adds its line to ``problems``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    def _rule(self, info: ValidationInfo, keys: tuple[str, ...], ok: Callable[..., bool], allowed: str) -> None:
        flat = self.model_extra
        if not all(k in flat for k in keys):
            return
        try:
            if ok(*(flat[k] for k in keys)):
                return
            prefix = (info.context or {}).get("prefix", "")  # a section's keys are named with it, in the rule's words too
            shown = ", ".join(f"{prefix}{k}={flat[k]!r}" for k in keys)
            line = f"{shown} do not fit together; {re.sub(r'([a-z_]+[.][a-z_]+)', lambda m: prefix + m[1], allowed)}"
        except ParamError as exc:  # the data a rule needs could not be read
            line = str(exc)
        if line not in info.context["problems"]:
            info.context["problems"].append(line)

    def _sizes(self, info: ValidationInfo) -> Callable[[str], tuple[int, int]]:
        def sizes(dataset: str) -> tuple[int, int]:
            root = (info.context or {}).get("root", ".")
            try:
                return dataset_sizes(dataset, resolve_location({"_root": str(root)}, self.model_extra.get("data.root", "data")), root)
            except (ValueError, OSError) as exc:
                raise ParamError(f"data.dataset={dataset!r} could not be loaded to learn its size: {exc}") from None
        return sizes

    @model_validator(mode="after")
    def _training(self, info: ValidationInfo) -> "ParamRules":
        self._rule(info, ("train.peak_epoch", "train.epochs"), lambda p, e: p <= e, "train.peak_epoch must be <= train.epochs")
        return self

    @model_validator(mode="after")
    def _attribution(self, info: ValidationInfo) -> "ParamRules":
        n_ckpt = ("train.num_checkpoints",)
        self._rule(info, ("trak.num_models", *n_ckpt), lambda m, k: max(m) <= k, "every trak.num_models must be <= train.num_checkpoints")
        self._rule(info, ("attribution.ensemble_sizes", *n_ckpt), lambda m, k: max(m) <= k,
                   "every attribution.ensemble_sizes must be <= train.num_checkpoints")
        self._rule(info, ("attribution.tracin_epochs", "train.epochs"), lambda e, n: max(e) <= n,
                   "every attribution.tracin_epochs must be <= train.epochs")
        self._rule(info, ("attribution.selection_models", "train.num_checkpoints", "train.num_models"), lambda s, k, n: s + k <= n,
                   "the selection models (the last attribution.selection_models of the run) must not overlap the checkpointed ones")
        self._rule(info, ("attribution.num_targets", "data.dataset"), lambda t, d: t <= self._sizes(info)(d)[1],
                   "attribution.num_targets must be <= the test set size (0 scores every test example)")
        return self

    @model_validator(mode="after")
    def _datamodels(self, info: ValidationInfo) -> "ParamRules":
        self._rule(info, ("datamodels.model_counts", "train.num_models"), lambda c, n: max(c) <= n,
                   "every datamodels.model_counts must be <= train.num_models")
        self._rule(info, ("datamodels.model_counts", "datamodels.val_fraction"), lambda c, f: round(min(c) * f) >= MIN_RANKED,
                   f"the validation split of the smallest count must hold >= {MIN_RANKED} models to choose lambda")
        self._rule(info, ("counterfactuals.num_targets", "data.dataset"), lambda t, d: t <= self._sizes(info)(d)[1],
                   "counterfactuals.num_targets must be <= the test set size")
        self._rule(info, ("counterfactuals.ks", "data.dataset"), lambda ks, d: max(ks) < self._sizes(info)(d)[0],
                   "every counterfactuals.ks must be smaller than the training set (k examples are removed from it)")
        return self

    @model_validator(mode="after")
    def _denoising(self, info: ValidationInfo) -> "ParamRules":
        self._rule(info, ("denoising.steps", "model.schedule_steps"), lambda s, t: max(s) < t,
                   "every denoising.steps must be a sampling step below model.schedule_steps")
        self._rule(info, ("denoising.trajectories", "denoising.num_generated"), lambda j, g: j <= g,
                   "denoising.trajectories must be <= denoising.num_generated (they are the first generated samples)")
        self._rule(info, ("counterfactuals.num_targets", "denoising.trajectories"), lambda c, j: c <= j,
                   "counterfactuals.num_targets must be <= denoising.trajectories (the counterfactual retrains on attributed trajectories)")
        self._rule(info, ("counterfactuals.steps", "denoising.steps"), lambda c, s: set(c) <= set(s),
                   "every counterfactuals.steps must be one of denoising.steps (the steps whose attributions it removes)")
        return self

    @model_validator(mode="after")
    def _modeldiff(self, info: ValidationInfo) -> "ParamRules":
        self._rule(info, ("modeldiff.num_models", "train.num_models"), lambda m, n: m <= n,
                   "modeldiff.num_models must be <= train.num_models (an algorithm equal to the base run reuses its store)")
        self._rule(info, ("modeldiff.num_checkpoints", "train.num_checkpoints"), lambda m, n: m <= n,
                   "modeldiff.num_checkpoints must be <= train.num_checkpoints (the base run's checkpoints are reused)")
        self._rule(info, ("modeldiff.trak_models", "modeldiff.num_checkpoints"), lambda t, k: t <= k,
                   "modeldiff.trak_models must be <= modeldiff.num_checkpoints")
        self._rule(info, ("modeldiff.patch", "data.dataset"), lambda patch, d: patch["count"] + patch["test_count"] <= sum(self._sizes(info)(d)),
                   "modeldiff.patch.count and test_count must fit in the training and test sets")
        return self

    @model_validator(mode="after")
    def _unlearning(self, info: ValidationInfo) -> "ParamRules":
        self._rule(info, ("unlearning.om_oracles", "unlearning.num_models"), lambda o, n: o <= n,
                   "unlearning.om_oracles must be <= unlearning.num_models (OM averages that many of the independent oracles)")
        self._rule(info, ("unlearning.forget_sets", "data.dataset"), lambda sets, d: all(s["size"] < self._sizes(info)(d)[0] for s in sets),
                   "every forget set must be smaller than the training set")
        return self


def environment_problems(flat: dict[str, Any], root: str | Path = ".", prefix: str = "") -> list[str]:
    """What this machine must offer for the params to run, one line per lack: a visible CUDA
    device for ``device: cuda`` or GPUs per task, a Ray cluster that answers at
    ``execution.address``, the data files of ``data.dataset``, and the memory the largest arrays
    of the steps these params run need (:func:`datalens.core.memory.memory_problems`)."""
    found = []
    if not torch.cuda.is_available() and not prefix:  # a section's device is the shared one, named once above it
        if flat.get("device") == "cuda":
            found.append("device='cuda' is not allowed here: no CUDA device is visible; allowed values: auto, cpu")
        if flat.get("execution.num_gpus_per_task", 0) > 0:
            found.append(f"execution.num_gpus_per_task={flat['execution.num_gpus_per_task']!r} is not allowed here: "
                         "no CUDA device is visible; it must be 0")
    if flat.get("execution.backend") == "ray" and "execution.address" in flat:
        try:
            ray_reachable(flat["execution.address"])
        except (ValueError, ConnectionError) as exc:
            found.append(str(exc))
    if "data.dataset" in flat and "data.root" in flat:
        data_root = resolve_location({"_root": str(root)}, flat["data.root"])
        missing = missing_data(flat["data.dataset"], data_root, root)
        if missing:
            found.append(f"{prefix}data.root={flat['data.root']!r}: {missing}")
        else:  # the largest arrays of the steps these params run, against the memory they run in
            found += memory_problems(flat, lambda dataset: dataset_sizes(dataset, data_root, root), prefix)
    return found


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested params as dotted keys (lists, and mappings that are one param, stay values)."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        flat.update(flatten(v, key + ".") if isinstance(v, dict) and key not in SCHEMA else {key: v})
    return flat


def load_params(path: str | Path) -> dict:
    """The params file as a nested dict; a missing file or a YAML syntax error is one
    :class:`ParamError` line naming the file, line and column."""
    try:
        with open(path) as fh:
            tree = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ParamError(f"no params file at {path}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(x) for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x) or str(exc)
        raise ParamError(f"{Path(path).name}{where}: YAML syntax error: {what}") from None
    if not isinstance(tree, dict):
        raise ParamError(f"{Path(path).name}: it must be a mapping of sections (device, data, model, train, ...)")
    return tree


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


def stage_params(stage: str, params_path: str | Path = "params.yaml", overrides: dict | None = None,
                 environment: bool = True) -> dict:
    """The params of one stage as a nested dict: exactly the keys ``dvc.yaml`` declares,
    with ``overrides`` (dotted key -> value, also restricted to declared keys) applied,
    all validated before any work starts (with ``environment``, also against this machine)."""
    params_path = Path(params_path)
    root = repo_root(params_path.parent if params_path.is_absolute() else Path.cwd())
    if not params_path.is_absolute():
        params_path = root / params_path if not params_path.exists() else params_path
    full = flatten(load_params(params_path))
    keys = declared_params(stage, root)
    declared = {k for k in full if any(k == d or k.startswith(d + ".") for d in keys)}
    missing = [d for d in keys if not any(k == d or k.startswith(d + ".") for k in full)]
    if missing:
        raise ParamError(f"param '{missing[0]}' (declared by stage '{stage}') is missing from {params_path.name}")
    for k, v in (overrides or {}).items():
        if k not in declared:
            raise ParamError(f"override '{k}' is not a param of stage '{stage}'; its params: {', '.join(keys)}")
        full[k] = v
    flat = {k: full[k] for k in declared}
    validate(flat, root, environment)
    tree: dict = {}
    for k in sorted(flat):
        set_dotted(tree, k, copy.deepcopy(flat[k]))
    tree["_root"] = str(root)
    return tree


def check_params_file(path: str | Path = "params.yaml", environment: bool = False) -> None:
    """Validate a whole params file (every key and every rule between keys, and with
    ``environment`` this machine: GPU, Ray cluster, data), raising every problem at once:
    ``make repro`` and the pipeline's first stage run this, so bad input stops the pipeline
    before any stage."""
    path = Path(path).resolve()
    try:
        root = repo_root(path.parent)
    except FileNotFoundError:  # a params file outside any repo: import paths resolve beside it
        root = path.parent
    validate(flatten(load_params(path)), root, environment)


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    stamp = None
    if "--stamp" in args:  # the first stage of dvc.yaml: a constant file, so passing never reruns a stage
        stamp = args.pop(args.index("--stamp") + 1)
        args.remove("--stamp")
    try:  # on this machine too: a GPU, a Ray cluster or data the params need and it lacks is named here
        check_params_file(args[0] if args else "params.yaml", environment=True)
    except ParamError as exc:
        sys.exit("\n".join(f"params: {line}" for line in str(exc).splitlines()))
    if stamp:
        Path(stamp).parent.mkdir(parents=True, exist_ok=True)
        Path(stamp).write_text("params.yaml passed every check of datalens.core.config\n")
