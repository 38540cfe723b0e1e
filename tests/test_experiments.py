"""`dvc exp run -S key=value` through the repo's own dvc.yaml, on a tiny profile in a fresh git + DVC
project, and a bad value through plain `dvc repro`: one line naming the key, a non-zero exit
before any stage runs, and every result already computed left in place."""
import json

import pytest
import yaml

from dvc_project import make_project, sh

TINY = {"device": "cpu", "model.hidden": [16], "train.epochs": 5, "train.stack_size": 8, "train.num_models": 60,
        "train.block_size": 30, "train.num_checkpoints": 4, "attribution.selection_models": 20, "datamodels.model_counts": [50],
        "trak.num_models": [1, 2], "attribution.ensemble_sizes": [1, 2], "attribution.tracin_epochs": [2, 5],
        "modeldiff.num_models": 20, "modeldiff.num_checkpoints": 2, "modeldiff.trak_models": 2}





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
    assert metrics.read_text() == before and (proj / "stores" / "train_subsets.zarr").exists()


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
