# stepdiff: two commands do everything (see README.md).
#   make book   build the executed book into _build/html
#   make test   run the test suite
# Both create .venv and install requirements.txt (and the package, editable) when needed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8000

.PHONY: book test serve notebooks lint clean bootstrap

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

# A strict build from a fresh environment: warnings are errors, and every chapter runs.
# (An incremental rebuild would not repeat the warnings of unchanged pages.)
book: $(STAMP)
	rm -rf _build/html _build/.doctrees _build/jupyter_execute book/apidocs
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/jupyter-book build . --all -W -n --keep-going \
	  || { find _build/html/reports -name '*.err.log' -exec cat {} + 2>/dev/null; exit 1; }
	$(BIN)/python .ci/check_site.py _build/html
	@echo "The book is at $(abspath _build/html)/index.html (make serve to view it)."

serve:
	@test -f _build/html/index.html || { echo "run 'make book' first"; exit 1; }
	@echo "Serving _build/html at http://127.0.0.1:$(PORT)/"
	$(BIN)/python -m http.server $(PORT) --bind 127.0.0.1 --directory _build/html

# Every chapter as a notebook (no outputs) under _build/notebooks.
notebooks: $(STAMP)
	mkdir -p _build/notebooks
	find book -name '*.md' -path 'book/part*' | while read f; do \
	  out=_build/notebooks/$$(basename $$(dirname $$f))_$$(basename $${f%.md}).ipynb; \
	  $(BIN)/jupytext --quiet --to ipynb --output $$out $$f; echo $$out; done

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf _build book/apidocs
