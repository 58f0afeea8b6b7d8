# Muse: the two set-up commands.  `make speedrun` and `make test` each create .venv if missing,
# install the package (editable, with the dev extra) against constraints.txt, then do their job.
# A second run skips the install: the stamp file is newer than pyproject.toml and constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.muse-installed

.PHONY: install test speedrun lint clean screenshots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The suite on TEST_WORKERS processes (pytest-xdist): most tests pin one torch thread, so one process uses
# one core; 2 workers on CI's 2 cores take ~60% of the serial wall time. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

# docs/img/web-*.png: every web page at desktop and phone widths (system Chromium; docs/web.md)
screenshots: $(STAMP)
	$(BIN)/python bench/web_screenshots.py --out docs/img

speedrun: $(STAMP)
	$(BIN)/muse speedrun --out runs/speedrun

clean:
	rm -rf $(VENV) runs build src/*.egg-info .pytest_cache
