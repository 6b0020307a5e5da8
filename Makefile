# Two commands do all set-up on a fresh clone (see README):
#   make demo   - create the venv if missing, then run `prepdefense demo`
#   make test   - create the venv if missing, then run the default test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: 2.13.0 is a local CPU wheel here; a bare `torch` would pull a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# the APGD parity and interop peer (tests/test_apgd.py, tests/test_interop.py); --no-deps: its pins would pull other torch builds.
	$(BIN)/python -m pip install -q --no-deps torchattacks==3.5.1
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prepdefense demo --out demo-out

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_defense_throughput.py
