# stepdiff: two commands do everything (see README.md).
#   make book   build the executed book into _build/html
#   make test   run the test suite
# Both create .venv and install requirements.txt (and the package, editable) when needed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8000
# Chapters run at a time by `make book` (each kernel gets the CPU's threads divided by JOBS).
JOBS   ?= 2
MATHJAX := _build/vendor/node_modules/mathjax

.PHONY: book test site-test serve notebooks lint clean bootstrap

bootstrap: $(STAMP)

# Reinstall only when the requirements or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	# The chapters name the kernel "python3"; make it this environment's Python.
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (stepdiff)" > /dev/null
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest

# A strict build from a fresh environment: warnings are errors, and every chapter runs once.
# 1. tools/notebooks.py runs every chapter as a reader's downloaded notebook (set-up cells first,
#    a fresh kernel in an empty directory outside the repository), JOBS at a time, into
#    _build/.jupyter_cache; any failing cell stops here, with every failing chapter reported.
# 2. jupyter-book renders those outputs (STEPDIFF_PREEXECUTED: myst-nb's cache mode, on a cache
#    emptied and refilled in step 1, so nothing is stale), with warnings as errors. (An
#    incremental rebuild would not repeat the warnings of unchanged pages, hence --all.)
# 3. The offline site tests (links, anchors, images, downloads, no traceback or machine path).
book: $(STAMP)
	rm -rf _build/html _build/.doctrees _build/jupyter_execute _build/.jupyter_cache book/apidocs
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tools/notebooks.py execute --jobs $(JOBS)
	STEPDIFF_PREEXECUTED=1 PATH="$(abspath $(BIN)):$$PATH" $(BIN)/jupyter-book build . --all -W -n --keep-going \
	  || { find _build/html/reports -name '*.err.log' -exec cat {} + 2>/dev/null; exit 1; }
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/site/test_site.py
	@echo "The book is at $(abspath _build/html)/index.html (make serve to view it)."

# The built site in headless Chromium (and the offline checks again), after `make book`.
# Needs Debian's chromium and chromium-driver (.ci/run installs them) and npm, which fetches
# MathJax 3 for the test (the pages ask its CDN; the test serves this copy, offline).
site-test: $(STAMP)
	@test -f _build/html/index.html || { echo "no built site: run 'make book' first"; exit 1; }
	test -f $(MATHJAX)/es5/tex-mml-chtml.js || npm install --prefix _build/vendor --no-audit --no-fund --loglevel=error mathjax@3
	$(BIN)/python -m pytest -p no:cacheprovider tests/site

serve:
	@test -f _build/html/index.html || { echo "run 'make book' first"; exit 1; }
	@echo "Serving _build/html at http://127.0.0.1:$(PORT)/"
	$(BIN)/python -m http.server $(PORT) --bind 127.0.0.1 --directory _build/html

# Every chapter of _toc.yml as the notebook a reader downloads (set-up cells first, no outputs):
# _build/notebooks/book/partN/NN_name.ipynb.
notebooks: $(STAMP)
	$(BIN)/python tools/notebooks.py write _build/notebooks

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf _build book/apidocs
