# sslab — make targets. `make demo` and `make test` are the two commands in README's quick start.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# ffcv 1.0.2 is built from source: it needs pkg-config, OpenCV and libjpeg-turbo headers.
SYSTEM_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist
# tests/test_mlflow_server.py starts a throwaway PostgreSQL (not in the image: the cluster's is a service),
# tests/test_mlflow_ui.py a headless Chromium; installed when setup can (root + apt), else a note: those
# test files skip without them
TEST_PACKAGES := postgresql chromium
PYTEST_ARGS ?=

.PHONY: setup system-packages venv test test-fast demo bench-loader clean help

help:
	@echo "make setup   install system packages (apt) and the project into $(VENV)/ (idempotent)"
	@echo "make demo    setup + the main job on the embedded default (Fashion-MNIST, local CPU)"
	@echo "make test    setup + the CPU test suite (what CI runs)"
	@echo "make test-fast   the suite without the tests marked slow (Ray clusters, MLflow servers, learning runs)"
	@echo "make bench-loader   loader throughput benchmark (writes bench/results/loader-*.json)"

setup: system-packages venv

system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES) $(TEST_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	needed=$$(for p in $$missing; do case " $(TEST_PACKAGES) " in *" $$p "*) ;; *) echo $$p;; esac; done); \
	if [ -n "$$missing" ] && [ -z "$$needed" ] && { [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; }; then \
	  echo "setup: note: $$missing not installed (tests/test_mlflow_server.py and tests/test_mlflow_ui.py skip without them):" \
	       "sudo apt-get install -y $$missing" >&2; missing=; fi; \
	if [ -z "$$missing" ]; then echo "setup: system packages present"; \
	elif ! command -v apt-get >/dev/null; then \
	  echo "setup: missing system packages ($$missing) and no apt-get: install their equivalents for your OS, then rerun make setup" >&2; exit 1; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "setup: missing system packages; run this once, then rerun make setup:" >&2; \
	  echo "  sudo apt-get update && sudo apt-get install -y $$missing" >&2; exit 1; \
	else echo "setup: installing $$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,ffcv]'
	@touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup  # everything but the tests marked slow (Ray clusters, MLflow servers, learning runs)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/sslab demo

bench-loader: setup
	$(PY) bench/loader.py

clean:
	rm -rf $(VENV) .state build *.egg-info
