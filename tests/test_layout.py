"""The package's shape: layer folders whose imports flow one way (core -> tasks -> training ->
attribution -> evaluation -> applications -> reporting), imports at the top of modules, no
classification below the applications but in its own task, and every DVC stage depending on
every datalens module its notebook runs (transitively), so `dvc status` cannot call a result up
to date after a change to code that made it."""
import ast
import json
import re
import subprocess
from pathlib import Path

import yaml

from datalens.core.config import declared_params, flatten, load_params

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "datalens"
LAYERS = ["core", "tasks", "training", "attribution", "evaluation", "applications", "reporting"]
OPTIONAL = {"ray", "fast_jl", "kronfluence"}  # heavy optional dependencies may be imported lazily
# What only a classification task may say: its loss, its margin, its classes.
CLASSIFICATION = re.compile(r"cross_entropy|margins_from_logits|ClassificationTask|num_classes|one_hot|argmax")


def modules() -> dict[str, Path]:
    """Dotted module name (``core.data``) -> path, for every module in a layer folder."""
    return {f"{p.parent.name}.{p.stem}": p for p in SRC.glob("*/*.py") if p.stem != "__init__"}


def _datalens_imports(tree: ast.AST) -> set[str]:
    """Dotted ``layer.module`` names a piece of code imports (``from datalens.core import data`` too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "datalens":
            parts = node.module.split(".")
            if len(parts) == 2:
                found |= {f"{parts[1]}.{a.name}" for a in node.names}
            elif len(parts) >= 3:
                found.add(f"{parts[1]}.{parts[2]}")
        elif isinstance(node, ast.Import):
            found |= {".".join(a.name.split(".")[1:3]) for a in node.names if a.name.startswith("datalens.")}
    return found


def closure(names: set[str]) -> set[str]:
    seen, todo, mods = set(), list(names), modules()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += _datalens_imports(ast.parse(mods[m].read_text()))
    return seen


def _notebook_imports(path: Path) -> set[str]:
    code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    return _datalens_imports(ast.parse(code))


def test_every_module_sits_in_a_layer_and_imports_only_downwards():
    assert {p.stem for p in SRC.glob("*.py")} == {"__init__"}, "modules belong in a layer folder"
    assert {p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS)
    for name, path in modules().items():
        for dep in _datalens_imports(ast.parse(path.read_text())):
            assert dep in modules(), f"{name} imports {dep}, which does not exist"
            lo, hi = LAYERS.index(dep.split(".")[0]), LAYERS.index(name.split(".")[0])
            assert lo <= hi, f"{name} (layer {name.split('.')[0]}) imports the higher {dep}"
    assert not any(m.startswith("reporting.") for m in closure(set(modules()) - {m for m in modules() if m.startswith("reporting.")})), \
        "a method module reaches the reporting layer"


def test_no_module_below_the_applications_assumes_classification():
    for name, path in modules().items():
        layer = name.split(".")[0]
        if LAYERS.index(layer) >= LAYERS.index("applications") or name == "tasks.classification":
            continue
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        # a run makes its task; a dataset may have labels (a task decides what they mean); a language
        # model classifies each next token, so its task shares classification's margin
        allowed = {"training.runs": {"ClassificationTask", "num_classes"}, "core.data": {"num_classes"},
                   "tasks.language": {"argmax", "margins_from_logits"}}.get(name, set())
        found = set(CLASSIFICATION.findall(code)) - allowed
        assert not found, f"{name} assumes classification: {sorted(found)}"


def test_imports_sit_at_the_top_of_modules():
    for path in modules().values():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        names = [inner.module] if isinstance(inner, ast.ImportFrom) else [a.name for a in inner.names]
                        assert all(n.split(".")[0] in OPTIONAL for n in names), f"{path.name}:{inner.lineno} imports {names} lazily"


def test_every_stage_depends_on_all_the_code_its_notebook_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        notebooks = [d for d in stage["deps"] if d.endswith(".ipynb")]
        commands = set(re.findall(r"python -m datalens\.(\w+\.\w+)", stage["cmd"]))  # e.g. core.stages, which runs the notebook
        assert notebooks or name == "check_params", name
        # and the modules its params name by import path (a dataset or model of the package's own, e.g. the CLIP section's)
        flat = flatten(load_params(ROOT / "params.yaml"))
        named = {v.split(":")[0][len("datalens."):] for k, v in flat.items()
                 if isinstance(v, str) and v.startswith("datalens.") and ":" in v
                 and any(k == d or k.startswith(d + ".") for d in declared_params(name, ROOT))}
        needed = closure(commands | named | set().union(set(), *(_notebook_imports(ROOT / nb) for nb in notebooks)))
        declared = {d[len("src/datalens/"):-3].replace("/", ".") for d in stage["deps"] if d.startswith("src/datalens/")}
        assert needed <= declared, f"stage {name} runs {sorted(needed - declared)} but does not depend on them"
        assert declared <= needed, f"stage {name} depends on {sorted(declared - needed)}, which it never runs"


def test_the_repo_cites_its_own_methods_doc():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert (ROOT / "docs" / "methods.md").exists()
    name = "METHODS" + ".md"  # spelled apart so this file does not cite it
    citing = [f for f in tracked if f.endswith((".py", ".md", ".yaml", ".ipynb")) and (ROOT / f).exists()
              and name in (ROOT / f).read_text()]
    assert citing == [], f"files citing a {name} the repo does not contain: {citing}"
