"""`dvc exp run -S key=value` through the repo's own dvc.yaml, on a tiny profile in a fresh git + DVC
project: more models, fewer held-out models (the store's first ones, no training), the README's
TRAK experiment (its own feature store), switching params back and forth (each set keeps its
store), a bad value through plain `dvc repro` (one line naming the key, before any stage runs) and
a stage that fails inside its notebook (one line, and its last good outputs back in place)."""
import json
import shutil

import pytest
import yaml

from dvc_project import make_project, sh

TINY = {"device": "cpu", "model.hidden": [16], "train.epochs": 5, "train.stack_size": 8, "train.num_models": 60,
        "train.block_size": 30, "train.num_checkpoints": 4, "attribution.selection_models": 20, "datamodels.model_counts": [50],
        "trak.num_models": [1, 2], "attribution.ensemble_sizes": [1, 2], "attribution.tracin_epochs": [2, 5],
        "modeldiff.num_models": 20, "modeldiff.num_checkpoints": 2, "modeldiff.trak_models": 2, "evaluation.num_masks": 10,
        "trak.proj_dims": [16, 32], "datamodels.num_lambdas": 5, "attribution.ekfac_dampings": [0.1]}





def _metrics_of(node, found):
    """Every (params, metrics) pair in `dvc exp show --json` output, wherever it nests them."""
    if isinstance(node, dict):
        if "params" in node and "metrics" in node:
            found.append((node["params"], node["metrics"]))
        for v in node.values():
            _metrics_of(v, found)
    elif isinstance(node, list):
        for v in node:
            _metrics_of(v, found)
    return found


@pytest.mark.slow
def test_dvc_experiments_and_a_bad_param_through_plain_dvc_repro(root, tmp_path):
    proj = tmp_path / "proj"
    params = make_project(root, proj, TINY)
    (proj / ".gitignore").write_text("stores/\n")
    sh(["git", "init", "-q"], proj)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "empty"], proj)
    sh(["dvc", "init", "-q"], proj)
    sh(["git", "add", "-A"], proj)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "tiny project"], proj)

    sh(["dvc", "exp", "run", "train_subsets", "-S", "train.num_models=70", "-n", "more-models"], proj)
    shown = _metrics_of(json.loads(sh(["dvc", "exp", "show", "--json"], proj).stdout), [])
    runs = [(p, m) for p, m in shown if m and "reports/train_subsets/metrics.json" in json.dumps(m)]
    assert any('"num_models": 70' in json.dumps(p) and '"num_models": 70' in json.dumps(m) for p, m in runs), shown
    metrics = proj / "reports" / "train_subsets" / "metrics.json"
    before = metrics.read_text()

    params["train"]["alpha"] = 1.5
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    failed = sh(["dvc", "repro"], proj, check=False)
    assert failed.returncode != 0
    said = failed.stdout + failed.stderr
    lines = [l for l in said.splitlines() if "train.alpha=1.5" in l]
    assert len(lines) == 1 and "(0.0, 1.0]" in lines[0], said
    assert "Running stage 'train_subsets'" not in said  # stopped before any stage
    assert metrics.read_text() == before and len(list((proj / "stores" / "train_subsets").glob("*.zarr"))) == 1
    params["train"]["alpha"] = 0.5
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # fewer held-out models than the store holds: its first ones, nothing trained, no block-size complaint
    sh(["dvc", "repro", "eval_models"], proj)
    [eval_store] = (proj / "stores" / "eval_models").glob("*.zarr")
    stamps = _mtimes(eval_store)
    sh(["dvc", "exp", "run", "eval_models", "-S", "evaluation.num_masks=6", "-n", "fewer-masks"], proj)
    assert json.loads((proj / "reports" / "eval_models" / "metrics.json").read_text())["num_models"] == 6 * params["evaluation"]["repeats"]
    assert _mtimes(eval_store) == stamps and list((proj / "stores" / "eval_models").glob("*.zarr")) == [eval_store]

    # other params and back: each set of params gets its own store, and switching back trains nothing
    [first] = (proj / "stores" / "train_subsets").glob("*.zarr")
    stamps = _mtimes(first)
    sh(["dvc", "exp", "run", "train_subsets", "-S", "model.hidden=[8]", "-n", "narrower"], proj)
    assert len(list((proj / "stores" / "train_subsets").glob("*.zarr"))) == 2
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))  # `dvc exp run -S` left its values in the file
    sh(["dvc", "exp", "run", "train_subsets", "-n", "back"], proj)
    assert _mtimes(first) == stamps and json.loads(metrics.read_text())["num_models"] == 60

    # the README's experiment, as written there: other TRAK dimensions get their own feature store
    sh(["dvc", "repro", "attribution_comparison"], proj)
    sh(["dvc", "exp", "run", "attribution_comparison", "-S", "trak.proj_dims=[8]", "-n", "trak-k8"], proj)
    assert len(list((proj / "stores" / "trak_features").glob("*.zarr"))) == 2
    assert "best_lds_trak" in json.loads((proj / "reports" / "attribution_comparison" / "metrics.json").read_text())

    # a stage that fails inside its notebook: one line naming the error, and the last good outputs back
    kept = {p: p.read_bytes() for p in (proj / "reports" / "eval_models").rglob("*") if p.is_file()}
    shutil.rmtree(eval_store / "completed")  # a store damaged behind the pipeline's back
    failed = sh(["dvc", "repro", "-f", "eval_models"], proj, check=False)
    said = [l for l in failed.stderr.splitlines() if l.startswith("eval_models failed:")]
    assert failed.returncode != 0 and len(said) == 1 and "StoreError" in said[0] and "logs/eval_models.log" in said[0], failed.stderr
    assert {p: p.read_bytes() for p in (proj / "reports" / "eval_models").rglob("*") if p.is_file()} == kept


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_fresh_clone_finds_nothing_stale(root, tmp_path):
    """`dvc status` on a clone of what is committed: every stage's code, params and command match the
    committed dvc.lock, so only outputs that a fresh clone cannot have yet (stores, figures and
    executed notebooks, made by `make repro`) and the paper-scale tarball are listed."""
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    status = json.loads(sh(["dvc", "status", "--json"], clone).stdout)
    tracked = set(sh(["git", "ls-files"], clone).stdout.split())
    for stage, changes in status.items():
        if stage == "data.dvc":  # the CIFAR-10 tarball, fetched on demand (README)
            continue
        for change in changes:
            assert set(change) <= {"changed outs", "changed deps"}, f"{stage} is stale in a fresh clone: {change}"
            assert set(change.get("changed outs", {}).values()) <= {"not in cache"}, f"{stage}: {change}"
            # a dep may only be missing, and only if it is another stage's output (a store), never committed code
            deps = change.get("changed deps", {})
            assert set(deps.values()) <= {"deleted"} and not set(deps) & tracked, f"{stage}: {change}"
