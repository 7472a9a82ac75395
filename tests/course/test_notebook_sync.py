"""notebooks/*.ipynb are exactly what tools/sync_notebooks.py generates from notebooks/*.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[2]


def _load_sync():
    return load_script("tools/sync_notebooks.py")


sync = _load_sync()

SOURCE = '''# %% [markdown]
# # A title
#
# Goals.

# %% tags=["parameters"]
OUTPUT_DIR = "runs/99_demo"  # where results go
SEED = 0  # random seed

# %%
x = 1 + SEED
x
'''


def test_notebooks_in_sync():
    problems = sync.out_of_sync()
    assert not problems, "notebooks out of sync with their .py sources — run `make notebooks`:\n" + "\n".join(problems)


def test_convert_is_deterministic_and_clean(tmp_path):
    src = tmp_path / "99_demo.py"
    src.write_text(SOURCE)
    text = sync.convert(src)
    assert text == sync.convert(src)
    nb = json.loads(text)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert "jupytext" not in nb["metadata"]
    assert [c["cell_type"] for c in nb["cells"]] == ["markdown", "code", "code"]
    ids = [c["id"] for c in nb["cells"]]
    assert ids == [sync.cell_id("99_demo", i) for i in range(3)] and len(set(ids)) == 3
    assert nb["cells"][1]["metadata"]["tags"] == ["parameters"]
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_check_reports_stale_and_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(sync, "NOTEBOOK_DIR", tmp_path)
    src = tmp_path / "99_demo.py"
    src.write_text(SOURCE)
    assert sync.main(["--check"]) == 1  # .ipynb missing
    assert sync.main([]) == 0
    assert sync.main(["--check"]) == 0
    src.write_text(SOURCE + "\n# %%\ny = 2\n")
    assert sync.out_of_sync() == ["99_demo.ipynb: differs from what 99_demo.py generates"]
    (tmp_path / "98_orphan.ipynb").write_text("{}")
    assert "98_orphan.ipynb: has no source 98_orphan.py" in sync.out_of_sync()


def test_unparsable_source_names_the_file(tmp_path, monkeypatch):
    src = tmp_path / "99_bad.py"
    src.write_text(SOURCE)

    def broken_reads(*args, **kwargs):
        raise RuntimeError("cannot parse")

    monkeypatch.setattr(sync.jupytext, "reads", broken_reads)
    with pytest.raises(ValueError, match="99_bad.py.*cannot parse"):
        sync.convert(src)
