# lenet: every target sets up what it needs on a fresh machine.
#   make train   set up, get Fashion-MNIST, train the textbook LeNet (the book's recipe)
#   make test    set up (incl. the browser for the web-page test where apt can install it), run the tests
#   make test-fast   the edit-test loop: the tests not marked slow (no browser set-up)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LENET  := $(VENV)/bin/lenet
# The CPU build of torch 2.13.0: pip finds it on this machine's disk; elsewhere it comes from PyPI.
TORCH_SPEC ?= torch==2.13.0
# Tests read real data from here (CI: the shared folder beside the clone); training never does.
TEST_DATA_ROOT ?= $(or $(LENET_DATA_ROOT),$(abspath ../shared/data))

.PHONY: setup train data test test-fast browser clean help

help:
	@sed -n '2,4p' Makefile

$(VENV)/.installed: pyproject.toml
	@echo ">> creating $(VENV) and installing PyTorch ($(TORCH_SPEC)) and lenet's dependencies"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[export,test,tune,ray]"
	@touch $@

# A C++ compiler builds lenet's CPU conv kernels and torch.compile's code (without one, training
# uses PyTorch's convolutions eagerly: correct, slower).
setup: $(VENV)/.installed
	@command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo ">> installing g++ for lenet's CPU kernels"; \
	    (apt-get install -y -q g++ >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q g++ >/dev/null; }) \
	      || echo ">> could not install g++: training will use PyTorch's convolutions"; \
	  else echo ">> no C++ compiler: training will use PyTorch's convolutions (install g++ for the fast kernels)"; fi; }

# Data: already present (--data-root/LENET_DATA_ROOT, cache, Debian's folder), else a verified
# download, else Debian's dataset-fashion-mnist package where apt-get may run.
data: setup
	@$(LENET) data fetch --dataset fashion-mnist || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo ">> download failed: installing Debian's dataset-fashion-mnist package instead"; \
	    (apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }) \
	      && $(LENET) data fetch --dataset fashion-mnist; \
	  else exit 1; fi; }

train: data
	$(LENET) train $(ARGS)

# Debian's Chromium + ChromeDriver for the end-to-end test of `lenet serve` (skipped without them).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo ">> installing Debian's chromium and chromium-driver for the browser test"; \
	  (apt-get install -y -q chromium chromium-driver >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }) \
	    || echo ">> could not install chromium: the browser test will be skipped"; \
	else echo ">> no chromium and no apt-get as root: the browser test will be skipped"; fi

test: setup browser
	LENET_DATA_ROOT="$(TEST_DATA_ROOT)" $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	LENET_DATA_ROOT="$(TEST_DATA_ROOT)" $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Load test of `lenet serve` with Debian's ApacheBench (ab), then a 60 s soak:
#   make bench-serve RUN=runs/mnist [BENCH_ARGS="--workers 2"]
.PHONY: bench-serve
bench-serve: setup
	@test -n "$(RUN)" || { echo "usage: make bench-serve RUN=RUN_DIR (a run trained on MNIST)"; exit 2; }
	@command -v ab >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo ">> installing Debian's apache2-utils for ab"; \
	    apt-get install -y -q apache2-utils >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q apache2-utils >/dev/null; }; \
	  else echo "ab is missing: install apache2-utils"; exit 1; fi; }
	LENET_DATA_ROOT="$(TEST_DATA_ROOT)" $(PY) benchmarks/load_serve.py $(RUN) --soak 60 $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
