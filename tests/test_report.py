"""The report page: one self-contained HTML file that a browser opens offline with every image."""
import base64
import io
import re

import matplotlib
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from browser import open_offline
from datalens.reporting.report_page import load_published, render_html

matplotlib.use("Agg")


def _png() -> str:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def test_rendered_report_opens_offline_with_every_image_and_no_code(tmp_path):
    nb = new_notebook(cells=[new_markdown_cell("# a report"), new_code_cell("secret_code_line = 1", outputs=[
        new_output("display_data", data={"image/png": _png(), "text/plain": "<Figure>"}),
        new_output("display_data", data={"image/png": _png(), "text/plain": "<Figure>"})])])
    path = tmp_path / "report.ipynb"
    nbformat.write(nb, str(path))
    html = render_html(path, tmp_path / "index.html")
    text = html.read_text()
    assert "secret_code_line" not in text and "<h1" in text
    page = open_offline(html, tmp_path / "screenshot.png")
    assert page == {"images": 2, "loaded": 2, "remote": []}
    assert (tmp_path / "screenshot.png").stat().st_size > 1000


def test_a_page_that_needs_the_network_is_refused(tmp_path):
    nb = new_notebook(cells=[new_markdown_cell('<img src="https://example.org/x.png">')])
    nbformat.write(nb, str(tmp_path / "r.ipynb"))
    with pytest.raises(ValueError, match="from the network"):
        render_html(tmp_path / "r.ipynb", tmp_path / "index.html")


def test_published_numbers_come_with_their_sources(root):
    published = load_published(root / "docs" / "published.yaml")
    for key, n in published["numbers"].items():
        assert isinstance(n["value"], (int, float)) and n["where"] and n["what"], key
        assert n["source"] in published["sources"], key
    for key, f in published["findings"].items():  # a plot's finding, in words: no number in it
        assert f["finding"] and f["where"] and not re.search(r"\d", f["finding"]) and f["source"] in published["sources"], key
