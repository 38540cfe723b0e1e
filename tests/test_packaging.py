import re
import tomllib

import yaml


def test_environment_yml_mirrors_pyproject_pins(root):
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((root / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert all("==" in d for d in deps), "every dependency is pinned"
    assert sorted(deps) == sorted(d for d in pip_section if not d.startswith("-e"))
    assert "python=3.11" in env["dependencies"]


def test_dvc_analytics_off_in_repo_config(root):
    assert re.search(r"analytics\s*=\s*false", (root / ".dvc" / "config").read_text())
