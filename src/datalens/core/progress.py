"""Progress bars that suit where the work runs.

* In JupyterLab (or any interactive session): ``tqdm.auto``, a live widget when ipywidgets is
  installed, with an estimate of the time left.
* Under ``dvc repro`` the stage commands set ``DATALENS_PROGRESS=log``: no one watches the
  papermill kernel (papermill's own bar shows the notebook's cells, with the time left, on the
  terminal), and every update would become a line of the executed notebook. There a bar stays
  silent for its first minute, then writes a line a minute (with the time left), and always ends
  as one line on standard output: its final state.
"""
from __future__ import annotations

import os
import sys

from tqdm import std
from tqdm.auto import tqdm as auto_tqdm

ENV = "DATALENS_PROGRESS"


class LogBar(std.tqdm):
    """A bar for a notebook that no one watches: a line a minute at most, one line at the end."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("mininterval", 60.0)
        kwargs.setdefault("delay", 60.0)
        kwargs.setdefault("ascii", True)
        self._summary_written = False
        super().__init__(*args, **kwargs)

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):  # shown at the next line, not drawn now
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

    def set_description(self, desc=None, refresh=False):
        super().set_description(desc, refresh=refresh)

    def close(self):
        if not self.disable and not self._summary_written:
            self._summary_written = True
            displayed = self.last_print_t >= self.start_t + self.delay
            if not displayed:  # tqdm's own close prints nothing for a bar it never showed
                print(self.format_meter(**self.format_dict), file=self.fp, flush=True)
        super().close()


def progress_bar(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)`` of the kind that suits the session (see the module docstring)."""
    if os.environ.get(ENV) == "log":
        return LogBar(iterable, **kwargs)
    return auto_tqdm(iterable, **kwargs)
