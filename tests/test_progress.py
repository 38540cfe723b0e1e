"""Progress bars: live in JupyterLab, one line per bar in a notebook that papermill runs for DVC."""
import io

from tqdm.auto import tqdm as auto_tqdm

from datalens.core.progress import ENV, LogBar, progress_bar


def test_a_bar_under_dvc_ends_as_one_line_of_the_notebook(monkeypatch):
    monkeypatch.setenv(ENV, "log")
    out = io.StringIO()
    with progress_bar(total=500, desc="train", unit="model", file=out) as bar:
        assert isinstance(bar, LogBar)
        for _ in range(5):
            bar.update(100)
            bar.set_postfix(test_acc=0.97)
    lines = out.getvalue().splitlines()
    assert lines == [lines[0]] and "train: 100%" in lines[0] and "500/500" in lines[0] and "test_acc=0.97" in lines[0]


def test_a_long_bar_under_dvc_writes_a_coarse_line_with_the_time_left(monkeypatch):
    monkeypatch.setenv(ENV, "log")
    out = io.StringIO()
    clock = iter(range(0, 10_000, 30))  # each reading of the clock 30 s after the last
    monkeypatch.setattr("tqdm.std.time", lambda: next(clock))
    bar = progress_bar(total=10, desc="fit", file=out)
    for _ in range(10):
        bar.update(1)
    bar.close()
    shown = [s for s in out.getvalue().replace("\r", "\n").splitlines() if s.strip()]
    assert 2 <= len(shown) <= 6  # a line a minute at most, not one per update
    assert "<" in shown[0] and "fit: 100%" in shown[-1]  # the time left, then the final state


def test_interactive_sessions_get_tqdm_auto(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    bar = progress_bar(total=1, disable=True)
    assert isinstance(bar, auto_tqdm) and not isinstance(bar, LogBar)
