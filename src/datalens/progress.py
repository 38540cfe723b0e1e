"""Progress bars that suit where the work runs.

* In JupyterLab (or any interactive session): ``tqdm.auto``, a live widget when ipywidgets is
  installed, with an estimate of the time left.
* Under ``dvc repro`` the stage commands set ``DATALENS_PROGRESS=terminal``: the notebook runs in a
  papermill kernel that no one watches, but whose standard error is the terminal that runs the
  stage. The bar (with its estimate of the time left) is drawn there, and the executed notebook
  keeps one line per bar, its final state, instead of a line per update.
"""
from __future__ import annotations

import os
import sys

from tqdm import std
from tqdm.auto import tqdm as auto_tqdm

ENV = "DATALENS_PROGRESS"


class TerminalBar(std.tqdm):
    """A bar drawn on the process's own standard error (the terminal of ``dvc repro``) that writes
    its final state once, as one line, to ``sys.stdout`` (the notebook) when it closes."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file", sys.__stderr__)
        kwargs.setdefault("mininterval", 1.0)
        self._summary_written = False
        super().__init__(*args, **kwargs)

    def close(self):
        if not self.disable and not self._summary_written:
            self._summary_written = True
            print(self.format_meter(**self.format_dict), file=sys.stdout, flush=True)
        super().close()


def progress_bar(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)`` of the kind that suits the session (see the module docstring)."""
    if os.environ.get(ENV) == "terminal":
        return TerminalBar(iterable, **kwargs)
    return auto_tqdm(iterable, **kwargs)
