# The two commands a new machine needs: `make demo` and `make test`.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
# torch 2.13.0: a CPU wheel from local disk on the project's machines; an unpinned torch
# pulls a multi-GB CUDA build. Override for a GPU box, e.g. TORCH_SPEC='torch==2.11.0'.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
PIP_QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: demo test test-fast test-gpu clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)" $(PIP_QUIET)
	$(VENV)/bin/pip install -q -e '.[test,browser]' $(PIP_QUIET)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/loraflow demo

# Browser tests (marker `browser`) drive Debian's chromium through Playwright; without it
# they are skipped, loudly, and with CI=true a missing chromium fails the run.
CHROMIUM ?= /usr/bin/chromium

test: $(STAMP)
	@if [ -x "$(CHROMIUM)" ]; then \
	  echo "browser tests: on, with $$($(CHROMIUM) --version 2>/dev/null | head -1)"; \
	else \
	  echo "######################################################################"; \
	  echo "## BROWSER TESTS SKIPPED: no $(CHROMIUM) (apt-get install chromium)"; \
	  echo "######################################################################"; \
	  if [ "$$CI" = "true" ]; then echo "CI=true: chromium is required"; exit 1; fi; \
	fi
	LORAFLOW_CHROMIUM=$(CHROMIUM) $(VENV)/bin/python -m pytest tests

# The inner loop for contributors: the unit tests (about a minute); `make test` is what CI runs.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" tests/unit

test-gpu: $(STAMP)
	$(VENV)/bin/python -m pytest -m gpu tests/gpu

clean:
	rm -rf $(VENV) build *.egg-info
