"""Running one DVC stage's notebook so that a failure costs nothing (``dvc.yaml`` calls this).

``python -m datalens.core.stages STAGE NOTEBOOK OUT_DIR [-- COMMAND ...]`` executes NOTEBOOK with
papermill into ``OUT_DIR/notebook.ipynb`` (``-p out_dir OUT_DIR``), then COMMAND if given. The full
log goes to ``logs/STAGE.log``; the terminal shows papermill's cell progress bar and COMMAND's output.

* On success it keeps a copy of the stage's outputs (every ``outs``/``metrics`` path in
  ``dvc.yaml`` that is not ``persist``: figures, metrics, results, the executed notebook) under
  ``.dvc/tmp/datalens-last-good/STAGE``.
* On failure (DVC has already removed those outputs before the command ran) it puts the last
  good ones back, from that copy or else from git's ``HEAD``, so a failed try loses nothing; then
  it ends with one line: the error the notebook raised and where the full log is. Stores are
  ``persist`` outputs: never removed, and resumable.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

BACKUP = Path(".dvc") / "tmp" / "datalens-last-good"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ERROR = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (.+)$")


def restorable_outputs(stage: str, root: Path) -> list[Path]:
    """The stage's non-persist outputs with literal paths (figures, metrics, notebook, fits)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
    paths = []
    for entry in spec.get("outs", []) + spec.get("metrics", []):
        path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        if not (options or {}).get("persist") and "${" not in path:
            paths.append(root / path)
    return paths


def _copy(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def keep_last_good(stage: str, root: Path) -> None:
    for path in restorable_outputs(stage, root):
        if path.exists():
            _copy(path, root / BACKUP / stage / path.relative_to(root))


def restore_last_good(stage: str, root: Path) -> list[str]:
    """Put back every output of the last good run; returns the paths restored."""
    restored = []
    for path in restorable_outputs(stage, root):
        rel = path.relative_to(root)
        kept = root / BACKUP / stage / rel
        if kept.exists():
            _copy(kept, path)
            restored.append(str(rel))
            continue
        tracked = subprocess.run(["git", "ls-files", "--", str(rel)], cwd=root, capture_output=True, text=True)
        if tracked.returncode == 0 and tracked.stdout.strip():  # a fresh clone: what the repo committed
            if path.exists() and not path.is_dir():
                path.unlink()
            subprocess.run(["git", "checkout", "HEAD", "--", str(rel)], cwd=root, capture_output=True)
            restored.append(str(rel))
    return restored


def last_error(log: str) -> str:
    """The last ``SomeError: message`` line of a log (ANSI colours removed), or a fallback."""
    lines = [_ANSI.sub("", line).strip() for line in log.splitlines()]
    errors = [line for line in lines if _ERROR.match(line)]
    return errors[-1] if errors else (next((l for l in reversed(lines) if l), "no output"))


def _run_logged(cmd: list[str], log, env: dict, show_all: bool) -> tuple[int, str]:
    """Run ``cmd`` with everything it says in ``log``; on the terminal only papermill's cell
    progress bar, redrawn in place (or everything, with ``show_all``), so a failure's traceback
    stays in the log and the terminal gets one line about it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    seen, bar = [], False
    for line in proc.stdout:  # text mode splits tqdm's carriage returns into lines too
        log.write(line)
        seen.append(line)
        if show_all:
            sys.stdout.write(line)
        elif line.startswith("Executing"):
            sys.stdout.write("\r" + line.rstrip("\n"))
            bar = True
        sys.stdout.flush()
    if bar:
        sys.stdout.write("\n")
    return proc.wait(), "".join(seen)


def run_stage(stage: str, notebook: str, out_dir: str, then: list[str] | None = None, root: Path | None = None) -> int:
    root = Path(root or Path.cwd())
    (root / out_dir).mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    log_path = root / "logs" / f"{stage}.log"
    env = {**os.environ, "DATALENS_PROGRESS": "log"}
    commands = [["papermill", "--log-level", "WARNING", notebook, f"{out_dir}/notebook.ipynb", "-p", "out_dir", out_dir]]
    if then:
        commands.append(then)
    with open(log_path, "w") as log:
        for i, cmd in enumerate(commands):
            code, said = _run_logged(cmd, log, env, show_all=i > 0)
            if code:
                break
    if code == 0:
        keep_last_good(stage, root)
        print(f"{stage}: notebook {out_dir}/notebook.ipynb, figures and metrics in {out_dir}/")
        return 0
    restored = restore_last_good(stage, root)
    kept = f"the last good run's outputs are back ({len(restored)} paths)" if restored else "no earlier run to restore"
    print(f"{stage} failed: {last_error(said)} | {kept}; full log: {log_path.relative_to(root)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    args = sys.argv[1:]
    then = None
    if "--" in args:
        then = args[args.index("--") + 1:]
        args = args[: args.index("--")]
    if len(args) != 3:
        sys.exit("usage: python -m datalens.core.stages STAGE NOTEBOOK OUT_DIR [-- COMMAND ...]")
    sys.exit(run_stage(*args, then=then))
