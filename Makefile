# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: demo test setup typecheck accuracy bench clean mutants

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -e '.[bench,accuracy,service,s3,dev]'
	# tensorrt-stubs declares a dependency on tensorrt, which cannot be installed here.
	$(BIN)/python -m pip install -qq --no-deps tensorrt-stubs
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/trtquant demo

typecheck: $(STAMP)
	$(BIN)/python tests/unit/test_engine_typecheck.py

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Mutation testing (not part of `make test`): the hand-written mutants of trtquant/functional.py against the
# six test files that must kill them (fails if one survives), then mutmut 3 over functional.py and
# calib/methods.py with their fast unit tests ([tool.mutmut] in pyproject.toml), both from temporary copies.
mutants: $(STAMP)
	$(BIN)/python tools/mutants.py
	$(BIN)/python tools/mutants.py --mutmut --max-children 2

accuracy: $(STAMP)
	$(BIN)/python bench/accuracy.py

bench: $(STAMP)
	$(BIN)/python bench/quant_overhead.py
	$(BIN)/python bench/calibration.py
	$(BIN)/python bench/ort_int8.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache
