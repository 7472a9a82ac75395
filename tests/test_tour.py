"""The tour index generator (tools/tour.py) on fake results; no notebook is executed."""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")

# A 1x1 red PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)


def _load_tour():
    spec = importlib.util.spec_from_file_location("tour", REPO / "tools" / "tour.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


tour = _load_tour()


@pytest.fixture
def fake_tour(tmp_path):
    """A tour directory with one notebook that ran and one that failed."""
    (tmp_path / "01_ok").mkdir()
    (tmp_path / "01_ok" / "loss.png").write_bytes(PNG)
    (tmp_path / "01_ok" / "01_ok.html").write_text("<html>executed</html>")
    results = [
        tour.NotebookResult(
            name="01_ok", title="Margin <contrastive> loss", ok=True, seconds=75.25,
            metrics={"final_loss": 0.123456, "steps": 10, "knn": {"top1": 0.5, "top5": 0.9},
                     "history": list(range(100)), "big": {str(i): i for i in range(50)}},
            figures=["01_ok/loss.png"], html="01_ok/01_ok.html",
        ),
        tour.NotebookResult(
            name="02_bad", title="InfoNCE", ok=False, seconds=3.0,
            error="cell 4 ('loss = f(x)'): ValueError: T must be > 0, got -1",
        ),
    ]
    index = tour.write_index(results, tmp_path)
    return tmp_path, index, results


def test_index_shows_each_notebook(fake_tour):
    _, index, _ = fake_tour
    page = index.read_text()
    assert "1 of 2 notebooks ran" in page
    assert 'id="nb-01_ok" data-status="ok"' in page and 'id="nb-02_bad" data-status="failed"' in page
    assert "Margin &lt;contrastive&gt; loss" in page  # titles are escaped
    assert "1 min 15 s" in page and "3.0 s" in page
    assert 'href="01_ok/01_ok.html"' in page and 'src="01_ok/loss.png"' in page
    assert "T must be &gt; 0, got -1" in page
    assert '<a href="#nb-02_bad">InfoNCE</a> — failed' in page  # contents list


def test_index_metrics_are_small_and_flat(fake_tour):
    _, index, _ = fake_tour
    page = index.read_text()
    for shown in ["final_loss", "0.1235", "knn.top1", "knn.top5"]:
        assert shown in page
    assert "history" not in page and "big." not in page  # curves and big tables are left out


def test_results_json_written(fake_tour):
    root, _, _ = fake_tour
    summary = json.loads((root / "results.json").read_text())
    assert [r["name"] for r in summary] == ["01_ok", "02_bad"]
    assert summary[1]["ok"] is False


def test_key_metrics_formats():
    shown = tour.key_metrics({"a": 1, "b": 0.5, "c": float("nan"), "d": True, "e": [1, 2.0], "f": "text",
                              "g": {"x": [1]}, "h": None})
    assert shown == {"a": "1", "b": "0.5", "c": "nan", "d": "True", "e": "[1, 2]", "f": "text", "h": "None"}


def test_title_and_output_images(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_markdown_cell("Intro\n\n## 05 · The momentum encoder\nmore"),
        nbformat.v4.new_code_cell("plot()", outputs=[nbformat.v4.new_output(
            "display_data", data={"image/png": base64.b64encode(PNG).decode(), "text/plain": "<Figure>"})]),
    ]
    assert tour.notebook_title(nb) == "05 · The momentum encoder"
    assert tour.notebook_title(nbformat.v4.new_notebook()) == ""
    # No PNG saved in OUTPUT_DIR: the figures come from the outputs.
    figures = tour.collect_figures(tmp_path, nb)
    assert [f.name for f in figures] == ["cell002_0.png"] and figures[0].read_bytes() == PNG
    # Saved PNGs take precedence.
    (tmp_path / "saved.png").write_bytes(PNG)
    assert [f.name for f in tour.collect_figures(tmp_path, nb)] == ["saved.png"]


def test_unknown_notebook_is_an_error(capsys):
    with pytest.raises(SystemExit):
        tour.main(["--only", "no_such_notebook"])
    assert "no notebook named" in capsys.readouterr().err


@pytest.mark.browser
def test_index_renders_in_chromium(fake_tour):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (install Debian's chromium: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[dev]')")
    _, index, _ = fake_tour
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(index.as_uri())
            assert page.locator("section.card").count() == 2
            assert page.locator("section.card.failed h2").inner_text() == "InfoNCE"
            img = page.locator("#nb-01_ok .figures img")
            img.scroll_into_view_if_needed()
            page.wait_for_function("() => [...document.images].every(i => i.complete)")
            assert img.evaluate("i => i.naturalWidth") == 1  # the thumbnail loaded
            page.locator("#nb-01_ok h2 a").click()
            page.wait_for_load_state()
            assert page.url.endswith("01_ok/01_ok.html")
        finally:
            browser.close()
