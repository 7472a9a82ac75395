"""The tour index generator (tools/tour.py) on fake results; no notebook is executed."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")

# A 1x1 red PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)


def _load_tour():
    return load_script("tools/tour.py")


tour = _load_tour()


@pytest.fixture
def fake_tour(tmp_path):
    """A tour directory with one notebook that ran and one that failed."""
    (tmp_path / "01_ok").mkdir()
    (tmp_path / "01_ok" / "loss.png").write_bytes(PNG)
    (tmp_path / "01_ok" / "01_ok.html").write_text("<html>executed</html>")
    effects = [
        {"claim": "InfoNCE beats the margin loss (kNN)", "holds": True,
         "detail": "InfoNCE kNN 57.1 % vs margin-loss kNN 21.7 %: +35.4 points, beyond the noise band of ±3.7 points"},
        {"claim": "m = 0.99 beats m = 0 <kNN>", "holds": False,
         "detail": "kNN at m = 0.99 22.0 % vs at m = 0 21.0 %: +1.0 points, inside the noise band of ±3.6 points"},
    ]
    results = [
        tour.NotebookResult(
            name="01_ok", title="Margin <contrastive> loss", ok=True, seconds=75.25,
            metrics={"final_loss": 0.123456, "steps": 10, "knn": {"top1": 0.5, "top5": 0.9},
                     "history": list(range(100)), "big": {str(i): i for i in range(50)},
                     "headline_effects": effects},
            figures=["01_ok/loss.png"], html="01_ok/01_ok.html", effects=effects,
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


def test_card_opens_with_headline_effects(fake_tour):
    _, index, _ = fake_tour
    page = index.read_text()
    card = page[page.index('<section class="card'):page.index('id="nb-02_bad"')]
    # The effects come before the raw metrics, each with its verdict, claim and detail (A vs B, band).
    assert card.index('<ul class="effects">') < card.index('<dl class="metrics">')
    assert ('<li class="holds"><span class="verdict">holds</span> InfoNCE beats the margin loss (kNN): '
            '<span class="detail">InfoNCE kNN 57.1 % vs margin-loss kNN 21.7 %: +35.4 points, beyond the noise band '
            'of ±3.7 points</span></li>') in card
    assert '<li class="fails"><span class="verdict">does not hold</span> m = 0.99 beats m = 0 &lt;kNN&gt;' in card
    assert 'class="card short"' in card and 'data-effects="1/2"' in card  # ran, but not every effect holds
    assert "1/2 effects hold" in card
    assert "1 of 2 headline effects hold" in page
    assert "No headline effects to judge" in page[page.index('id="nb-02_bad"'):]
    assert '"headline_effects"' not in page and "headline_effects" not in card.split("metrics.json")[-1]


def test_effect_not_measured():
    text = tour.render_effects([{"claim": "c", "holds": False, "detail": "not measured (KeyError('knn_acc'))"}])
    assert '<li class="fails"><span class="verdict">not measured</span> c:' in text


def test_headline_effects_stored_or_judged():
    stored = [{"claim": "c", "holds": True, "detail": "d"}]
    assert tour.headline_effects("04_queue_without_momentum", {"headline_effects": stored}) == stored
    # No stored verdicts: mocolab.lesson.judge_effects judges the metrics.
    metrics = {"num_test": 1000, "knn_acc_m099": 55.0, "knn_acc_m0": 20.0,
               "key_identification_m099": 0.2, "key_identification_m0": 0.5}
    judged = tour.headline_effects("04_queue_without_momentum", metrics)
    assert [e["holds"] for e in judged] == [True, False]
    assert judged[0]["detail"].startswith("kNN at m = 0.99 55.0 % vs at m = 0 20.0 %: +35.0 points, beyond the noise "
                                          "band of ±")
    assert judged[1]["detail"] == "keys identified at m = 0.99 0.2 % vs at m = 0 0.5 %: −0.3 points, not above zero, " \
                                  "which is required"
    assert tour.headline_effects("04_queue_without_momentum", {}) == []  # the notebook wrote nothing


def test_durations_are_rounded_before_they_are_split():
    assert tour._fmt_seconds(59.6) == "59.6 s" and tour._fmt_seconds(59.96) == "1 min 00 s"
    assert tour._fmt_seconds(119.6) == "2 min 00 s"  # not "1 min 60 s"
    assert tour._fmt_seconds(62.4) == "1 min 02 s" and tour._fmt_seconds(3725.0) == "62 min 05 s"
    assert tour._fmt_seconds(5.2, whole=True) == "5 s" and tour._fmt_seconds(59.6, whole=True) == "1 min 00 s"
    assert tour._fmt_seconds(80.4, whole=True) == "1 min 20 s"
    done = tour.NotebookResult(name="05", title="", ok=True, seconds=179.7)
    assert tour.log_line(done) == "ok     3 min 00 s  no headline effects"


def test_log_line():
    ok = tour.NotebookResult(name="05", title="", ok=True, seconds=62.0,
                             effects=[{"claim": "a", "holds": True}, {"claim": "b", "holds": True}])
    assert tour.log_line(ok) == "ok     1 min 02 s  2/2 effects hold"
    bad = tour.NotebookResult(name="06", title="", ok=False, seconds=3.0, notes=["no parameter EPOCHS (set anyway)"],
                              error="cell 4 ('x = f()'): ValueError: T must be > 0\n\nTraceback ...")
    assert tour.log_line(bad) == ("FAILED      3.0 s  no headline effects  cell 4 ('x = f()'): "
                                  "ValueError: T must be > 0  (no parameter EPOCHS (set anyway))")


def _tiny_notebook(source_after: str):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# 99 · Tiny"),
        nbformat.v4.new_code_cell('BANK_M = 0.5  # new = m·old + (1 − m)·q\nOUTPUT_DIR = "out"  # where = here',
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(source_after),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    return nb


def test_parameters_with_equals_in_comments_are_injected_without_warnings(tmp_path, caplog):
    import nbformat

    path = tmp_path / "99_tiny.ipynb"
    nbformat.write(_tiny_notebook("print(BANK_M)"), path)
    assert tour.notebook_parameters(nbformat.read(path, as_version=4)) == {"BANK_M", "OUTPUT_DIR"}
    with caplog.at_level("WARNING"):
        nb, unknown = tour.prepare_notebook(path, {"BANK_M": 0.9, "EPOCHS": 2}, "python3")
    assert not caplog.records  # papermill's inspection warns "Unable to parse line" on these lines
    assert unknown == ["EPOCHS"]
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "BANK_M = 0.9" in injected[0].source
    assert nb.cells.index(injected[0]) == 2  # right after the parameters cell


def test_kernel_transport(monkeypatch, tmp_path):
    import os

    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "rt"))
    short = tour.kernel_config().KernelManager
    if os.name == "posix" and len(str(tmp_path)) < 40:
        assert short.transport == "ipc"  # local sockets: nothing on the network, no warning
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / ("x" * 100)))
    assert "transport" not in tour.kernel_config().KernelManager  # too long for a Unix socket address


@pytest.mark.slow
def test_tour_log_is_one_clean_line_per_notebook(tmp_path, capfd):
    """A real run on a tiny notebook: one line for it, no papermill or kernel warnings."""
    import nbformat

    nb_dir = tmp_path / "nb"
    nb_dir.mkdir()
    nbformat.write(_tiny_notebook(
        "import json, pathlib\npathlib.Path(OUTPUT_DIR).mkdir(exist_ok=True)\n"
        "json.dump({'bank_m': BANK_M}, open(pathlib.Path(OUTPUT_DIR) / 'metrics.json', 'w'))"),
        nb_dir / "99_tiny.ipynb")
    assert tour.main(["--notebook-dir", str(nb_dir), "--out", str(tmp_path / "out"), "-p", "BANK_M", "0.9"]) == 0
    out, err = capfd.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[1].startswith("[tour] 99_tiny  ok ") and "no headline effects" in lines[1]
    # neither papermill's parameter warning nor the kernel's plain-TCP warning (libzmq may print an
    # unrelated line of its own when a kernel is shut down on a loaded machine)
    assert "Unable to parse line" not in err and "without encryption" not in err, err
    assert json.loads((tmp_path / "out" / "99_tiny" / "metrics.json").read_text()) == {"bank_m": 0.9}


@pytest.mark.slow
def test_tour_with_readme_records_it_and_writes_the_table(tmp_path, monkeypatch):
    """A real run on a tiny notebook with --readme: the record and the README table both come from it."""
    import nbformat

    nb_dir = tmp_path / "nb"
    nb_dir.mkdir()
    nbformat.write(_tiny_notebook(
        "import json, pathlib\npathlib.Path(OUTPUT_DIR).mkdir(exist_ok=True)\n"
        "json.dump({'bank_m': BANK_M, 'seed': 3}, open(pathlib.Path(OUTPUT_DIR) / 'metrics.json', 'w'))"),
        nb_dir / "99_tiny.ipynb")
    readme = tmp_path / "README.md"
    readme.write_text(f"{tour.TABLE_START}\n{tour.TABLE_END}\n")
    monkeypatch.setattr(tour, "README", readme)
    monkeypatch.setattr(tour, "RESULTS", tmp_path / "docs" / "tour_results.json")
    monkeypatch.setattr(tour, "README_ROWS", {"99_tiny": ("tiny", "", "BANK_M was {bank_m:g}")})
    argv = ["--notebook-dir", str(nb_dir), "--out", str(tmp_path / "out"), "--readme", "-p", "BANK_M", "0.9"]
    assert tour.main(argv) == 0
    record = json.loads(tour.RESULTS.read_text())
    assert record["command"] == "python tools/tour.py --readme -p BANK_M 0.9"
    assert record["parameters"] == {"BANK_M": 0.9}
    (entry,) = record["notebooks"]
    assert entry["name"] == "99_tiny" and entry["ok"] and entry["seed"] == 3 and entry["metrics"]["bank_m"] == 0.9
    table = tour.readme_table(readme.read_text())
    assert table == tour.render_table(record) and "| tiny |  | BANK_M was 0.9 |" in table
    assert "what the run measured (BANK_M = 0.9, seed 3, tour of" in table


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


# --------------------------------------------------------------------------
# The recorded tour and the README's notebook table
# --------------------------------------------------------------------------


def test_readme_table_is_the_recorded_tour():
    """README.md's notebook table is exactly what the recorded tour (docs/tour_results.json) renders to."""
    record = json.loads(tour.RESULTS.read_text(encoding="utf-8"))
    readme = tour.README.read_text(encoding="utf-8")
    assert tour.readme_table(readme) == tour.render_table(record), (
        "README.md's notebook table differs from docs/tour_results.json: "
        "run python tools/tour.py --readme-from docs/tour_results.json (or a new tour with --readme)")


def test_readme_rows_cover_every_notebook():
    stems = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]*_*.py"))
    assert list(tour.README_ROWS) == stems


def _placeholders(template: str) -> list[list[str]]:
    """The metric paths a README template reads, each split at "/"; sweep arguments count as paths."""
    paths = []
    for _, args, path, _spec in tour._PLACEHOLDER.findall(template):
        paths += [path.split("/")] if path else [a.strip().split("/") for a in args.split(",")]
    return paths


@pytest.mark.parametrize("name", sorted(tour.README_ROWS))
def test_readme_templates_read_what_the_notebook_writes(name):
    """Every metric a README row reads is a key its notebook writes (catches a metric renamed in a notebook)."""
    source = (REPO / "notebooks" / f"{name}.py").read_text(encoding="utf-8")
    template = tour.README_ROWS[name][2]
    assert tour._PLACEHOLDER.findall(template) or name == "00_setup_and_data"
    for path in _placeholders(template):
        for segment in (s for s in path if not s.replace(".", "").isdigit()):
            assert f'"{segment}"' in source, f"{name}: the README row reads {'/'.join(path)!r}"
    assert not re.search(r"\d\s?%", re.sub(tour._PLACEHOLDER, "", template)), \
        "a figure in a README row comes from the run, not from the template's words"


def _result(name, ok=True, seconds=65.2, **metrics):
    from mocolab.lesson import judge_effects

    metrics = {"num_test": 1000, "seed": 0, "device": "cpu", **metrics}
    metrics["headline_effects"] = judge_effects(name, metrics)
    return tour.NotebookResult(name=name, title=name, ok=ok, seconds=seconds, metrics=metrics,
                               effects=metrics["headline_effects"])


@pytest.fixture
def record():
    """A recorded tour (as the file holds it) in which one effect does not hold and one notebook failed."""
    results = [
        _result("01_margin_contrastive_loss", seconds=27.4, infonce_knn_acc=48.93, margin_knn_acc=28.9),
        _result("04_queue_without_momentum", seconds=119.6, m_slow=0.99, knn_acc_m099=53.1, knn_acc_m0=15.2,
                key_identification_m099=40.0, key_identification_m0=51.2),
        _result("05_momentum_encoder", ok=False, seconds=3.0),
    ]
    return json.loads(json.dumps(tour.tour_record(results, {}, "python tools/tour.py --readme")))


def test_record_keeps_what_each_notebook_measured(record):
    assert record["command"] == "python tools/tour.py --readme" and record["date"] and record["seconds"] == 150.0
    first = record["notebooks"][0]
    assert (first["name"], first["ok"], first["seconds"], first["seed"], first["device"]) == \
        ("01_margin_contrastive_loss", True, 27.4, 0, "cpu")
    assert first["metrics"]["infonce_knn_acc"] == 48.93 and "headline_effects" not in first["metrics"]
    assert first["effects"][0]["values"]["InfoNCE kNN"] == 48.93 and first["effects"][0]["holds"] is True
    assert tour.flat_metrics({"a": {"0.9": {"acc": 1.0, "curve": [1, 2]}}, "b": "x", "c": float("nan")}) == \
        {"a/0.9/acc": 1.0, "b": "x", "c": None}


def test_table_rows_are_written_from_the_record(record):
    table = tour.render_table(record)
    lines = table.splitlines()
    assert lines[0].startswith(f"| notebook | lesson | exercise | what the default run measured (seed 0, tour of "
                               f"{record['date']}; band = two standard errors of the difference) | time |")
    row = {line.split("`")[1]: line for line in lines if line.startswith("| [`")}
    assert row["01_margin_contrastive_loss"] == (
        "| [`01_margin_contrastive_loss`](notebooks/01_margin_contrastive_loss.py) | margin contrastive loss | ✎ the "
        "margin loss, batched | two runs that differ only in the loss: InfoNCE 48.9 % kNN vs the margin loss 28.9 % "
        "(+20.0 points, beyond the band ±4.1); 1 of 1 headline effect holds | 27 s |")
    assert row["04_queue_without_momentum"].endswith(
        "recomputed keys find their own stored key 40.0 % vs 51.2 % of the time; 1 of 2 headline effects hold (not: "
        "m = 0.99 identifies its keys better than m = 0) | 2 min 00 s |")
    assert "| **failed** in the recorded tour | 3 s |" in row["05_momentum_encoder"]
    assert row["00_setup_and_data"].endswith("| not in the recorded tour | — |")
    assert list(row) == list(tour.README_ROWS)
    assert lines[-1].startswith("Written from the tour that `python tools/tour.py --readme` recorded on ")
    assert "2 of 3 notebooks ran in 2 min 30 s in all (device cpu" in lines[-1]


def test_table_names_changed_parameters_and_missing_metrics(record):
    record["parameters"] = {"DEVICE": "cuda", "SEED": 1}
    assert "| what the run measured (DEVICE = 'cuda', seed 0, tour of" in tour.render_table(record)
    del record["notebooks"][0]["metrics"]["margin_knn_acc"]
    with pytest.raises(KeyError, match="01_margin_contrastive_loss: README_ROWS reads 'margin_knn_acc'"):
        tour.render_table(record)
    entry = {"name": "x", "metrics": {"num_test": 1000, "s/4/acc": 20.0, "s/64/acc": 31.25, "s/4/n": 1, "t": None}}
    assert tour.render_measured("K = {keys(s)}: {values(s, acc)} % (band {band(s/4/acc)}); {t} {cmp(t, s/4/acc)}",
                                entry) == "K = 4 / 64: 20.0 / 31.2 % (band ±3.6); not measured not measured"


def test_readme_table_is_replaced_between_its_markers(tmp_path, record, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{tour.TABLE_START}\nold table\n{tour.TABLE_END}\n\nafter\n")
    results = tmp_path / "tour_results.json"
    tour.save_record(record, results)
    monkeypatch.setattr(tour, "README", readme)
    assert tour.main(["--readme-from", str(results)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n<!-- tour-table:start -->\n| notebook |")
    assert text.endswith("<!-- tour-table:end -->\n\nafter\n")
    assert tour.readme_table(text) == tour.render_table(record) and "old table" not in text
    assert "wrote the notebook table of README.md" in capsys.readouterr().out
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="tour-table:start"):
        tour.write_readme_table(record, readme)


def test_a_row_that_reads_a_lost_metric_keeps_the_record(tmp_path, monkeypatch, capsys):
    """--readme after a tour whose notebook no longer writes a metric its row reads: the record is kept, exit 1."""
    (tmp_path / "01_margin_contrastive_loss.ipynb").write_text("{}")
    readme = tmp_path / "README.md"
    readme.write_text(f"{tour.TABLE_START}\nold\n{tour.TABLE_END}\n")
    monkeypatch.setattr(tour, "README", readme)
    monkeypatch.setattr(tour, "RESULTS", tmp_path / "tour_results.json")
    lost = _result("01_margin_contrastive_loss", infonce_knn_acc=48.9)  # margin_knn_acc is gone
    monkeypatch.setattr(tour, "run_tour", lambda *args: [lost])
    assert tour.main(["--notebook-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--readme"]) == 1
    assert "README_ROWS reads 'margin_knn_acc'" in capsys.readouterr().err
    assert json.loads(tour.RESULTS.read_text())["notebooks"][0]["metrics"]["infonce_knn_acc"] == 48.9
    assert "old" in readme.read_text()


def test_readme_records_a_whole_tour(capsys):
    with pytest.raises(SystemExit):
        tour.main(["--readme", "--only", "00_setup_and_data"])
    assert "--readme records a whole tour" in capsys.readouterr().err


def test_a_claim_that_needs_more_scale_is_shown_apart_and_not_counted():
    claim = {"claim": "clustering removes a quarter of the false negatives", "holds": False,
             "detail": "false-negative rate after clustering 0.09 vs before 0.1"}
    result = tour.NotebookResult(name="10_beyond_moco", title="10", ok=True, seconds=60.0,
                                 effects=[{"claim": "CMC beats its random init (kNN)", "holds": True, "detail": "x"}],
                                 at_scale=[claim])
    page = tour.render_index([result])
    assert "needs more scale" in page and claim["claim"] in page
    assert "1 of 1 headline effects hold" in page
    assert tour.effects_summary(result) == "1/1 effects hold"
