"""A fresh DVC project around the repo's own dvc.yaml, src/, notebooks/ and docs/, with the repo's
params.yaml changed by dotted keys: how the end-to-end tests run `dvc` as a user would."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from datalens.core.config import set_dotted


def sh(args, cwd, check=True):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if check and out.returncode:
        raise AssertionError(f"{args} failed:\n{out.stdout}\n{out.stderr}")
    return out


def make_project(root: Path, proj: Path, changes: dict) -> dict:
    """Lay the project out in ``proj`` (created) and return the params written to it."""
    proj.mkdir(exist_ok=True)
    shutil.copy(root / "dvc.yaml", proj / "dvc.yaml")
    for name in ("src", "notebooks", "docs"):
        (proj / name).symlink_to(root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in changes.items():
        set_dotted(params, key, value)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params
