import re
import tomllib

import yaml


def test_environment_yml_mirrors_pyproject_pins(root):
    project = tomllib.loads((root / "pyproject.toml").read_text())
    deps = project["project"]["dependencies"] + project["project"]["optional-dependencies"]["ekfac"]
    no_deps = project["tool"]["datalens"]["install-without-deps"]
    text = (root / "environment.yml").read_text()
    env = yaml.safe_load(text)
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert all("==" in d for d in deps + no_deps), "every dependency is pinned"
    assert sorted(deps) == sorted(d for d in pip_section if not d.startswith("-e"))
    assert all(f"pip install --no-deps {d}" in text for d in no_deps)
    assert "python=3.11" in env["dependencies"]


def test_make_venv_keeps_the_pinned_torch(root):
    # kronfluence's metadata asks for torchvision, whose installer would replace torch: it must go in with --no-deps
    from importlib.metadata import version
    assert version("torch").split("+")[0] == "2.13.0"
    assert version("kronfluence") == "1.0.1"
    makefile = (root / "Makefile").read_text()
    assert "--no-deps" in makefile and "install-without-deps" in makefile


def test_dvc_analytics_off_in_repo_config(root):
    assert re.search(r"analytics\s*=\s*false", (root / ".dvc" / "config").read_text())
