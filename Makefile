# mocolab — make tour | make test | make lab | make setup
#
# The virtual environment lives in $(VENV): .venv in the clone by default,
# or wherever MOCOLAB_VENV / VENV points (make test VENV=/path/to/venv).

MOCOLAB_VENV ?= .venv
VENV ?= $(MOCOLAB_VENV)
PYTHON := $(VENV)/bin/python
# Written after a successful install; rebuilt only when pyproject.toml changes.
STAMP := $(VENV)/.mocolab-setup.stamp
PYTEST_ARGS ?=
TOUR_ARGS ?=
LAB_ARGS ?=
# The pinned releases installed first on Linux x86_64 (within the pyproject ranges).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.DEFAULT_GOAL := help
.PHONY: help setup test tour lab notebooks solutions clean distclean

help:
	@echo "mocolab — contrastive self-supervised learning up to MoCo"
	@echo
	@echo "  make tour       run every notebook with its default parameters -> runs/tour/index.html"
	@echo "  make test       ruff, the unit tests, then every notebook through papermill at CI size"
	@echo "  make lab        JupyterLab on http://127.0.0.1 with the mocolab environment"
	@echo "  make setup      create $(VENV) and install mocolab with its dev extras (once)"
	@echo "  make notebooks  regenerate notebooks/*.ipynb from notebooks/*.py"
	@echo "  make solutions  run every exercise checker on the reference solutions (notebooks/solutions/)"
	@echo "  make clean      remove runs/ and caches (keeps the virtual environment)"
	@echo "  make distclean  clean, and remove .venv"
	@echo
	@echo "Variables: VENV=$(VENV) (or MOCOLAB_VENV), PYTEST_ARGS, TOUR_ARGS, LAB_ARGS"

$(PYTHON):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PYTHON)
	@if [ "$$(uname -s)-$$(uname -m)" = "Linux-x86_64" ]; then \
		echo "Installing $(TORCH_PIN) first"; \
		$(PYTHON) -m pip install $(TORCH_PIN); \
	fi
	$(PYTHON) -m pip install -e '.[dev]'
	$(PYTHON) -m ipykernel install --sys-prefix --name mocolab --display-name "Python (mocolab)"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PYTHON) -m ruff check . && $(PYTHON) -m pytest $(PYTEST_ARGS)

tour: setup
	$(PYTHON) tools/tour.py $(TOUR_ARGS)

lab: setup
	$(PYTHON) -m jupyter lab --ip=127.0.0.1 $(LAB_ARGS)

notebooks: setup
	$(PYTHON) tools/sync_notebooks.py

solutions: setup
	$(PYTHON) -m mocolab.exercises notebooks/solutions/solutions.py

clean:
	rm -rf runs notebooks/runs .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
	find notebooks -name .ipynb_checkpoints -type d -prune -exec rm -rf {} + 2>/dev/null || true

distclean: clean
	rm -rf .venv
