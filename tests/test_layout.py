"""The package's shape: imports flow one way, sit at the top of modules, and every DVC
stage depends on every datalens module its notebook runs (transitively), so `dvc status`
cannot call a result up to date after a change to code that made it."""
import ast
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "datalens"
# lower layers first: a module may import only modules of its own or a lower layer
LAYERS = [
    {"data", "models", "execution", "sampling", "progress"},
    {"config", "engine", "outputs", "store"},
    {"runs", "projection"},
    {"datamodels", "trak", "attribution"},
    {"evaluation", "counterfactuals"},
    {"comparison", "modeldiff", "unlearning", "unlearning_comparison"},
    {"plots"},
    {"reports"},
    {"report_page"},
]
LAYER_OF = {m: i for i, layer in enumerate(LAYERS) for m in layer}
OPTIONAL = {"ray", "fast_jl", "kronfluence"}  # heavy optional dependencies may be imported lazily


def _datalens_imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "datalens":
            if node.module == "datalens":
                found |= {a.name for a in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("datalens.")}
    return found


def closure(modules: set[str]) -> set[str]:
    seen, todo = set(), list(modules)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += _datalens_imports(ast.parse((SRC / f"{m}.py").read_text()))
    return seen


def _notebook_imports(path: Path) -> set[str]:
    code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    return _datalens_imports(ast.parse(code))


def test_every_module_has_a_layer_and_imports_only_downwards():
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    assert modules == set(LAYER_OF), f"modules without a layer: {modules - set(LAYER_OF)}; stale: {set(LAYER_OF) - modules}"
    for m in modules:
        for dep in _datalens_imports(ast.parse((SRC / f"{m}.py").read_text())):
            assert LAYER_OF[dep] <= LAYER_OF[m], f"{m} (layer {LAYER_OF[m]}) imports the higher {dep} (layer {LAYER_OF[dep]})"
    assert "plots" not in closure(modules - {"plots", "reports"}), "a method module reaches plots"


def test_imports_sit_at_the_top_of_modules():
    for path in SRC.glob("*.py"):
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
        if name == "check_params":  # runs datalens.config itself, before any notebook
            needed = closure({"config"})
        else:
            assert notebooks, name
            needed = closure(set().union(*(_notebook_imports(ROOT / nb) for nb in notebooks)))
        declared = {Path(d).stem for d in stage["deps"] if d.startswith("src/datalens/")}
        assert needed <= declared, f"stage {name} runs {sorted(needed - declared)} but does not depend on them"
        assert declared <= needed, f"stage {name} depends on {sorted(declared - needed)}, which it never runs"


def test_the_repo_cites_its_own_methods_doc():
    import subprocess
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert (ROOT / "docs" / "methods.md").exists()
    name = "METHODS" + ".md"  # spelled apart so this file does not cite it
    citing = [f for f in tracked if f.endswith((".py", ".md", ".yaml", ".ipynb")) and (ROOT / f).exists()
              and name in (ROOT / f).read_text()]
    assert citing == [], f"files citing a {name} the repo does not contain: {citing}"
