# The two set-up commands are `make run` and `make test`; see README.md.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
FIDES := $(VENV)/bin/fides
REPO ?= model_repository
PIP_QUIET ?= -q
LOCK := requirements.lock
PIP_TOOLS := pip-tools==7.7.0

.PHONY: install install-dev deploy-tools sync-deploy run models test lint lock protos bench clean

$(VENV)/bin/python:
	@echo "==> creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)

# Every install takes its versions from the lock file (requirements.lock, `make lock`), as
# constraints: torch first (its build chosen by scripts/install_torch.py), then the build
# backend, then the project without build isolation, so nothing resolves "the newest" anywhere.
CONSTRAINTS := $(VENV)/constraints.txt
PIP_INSTALL := $(PY) -m pip install $(PIP_QUIET) -c $(CONSTRAINTS)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml $(LOCK) scripts/install_torch.py
	@echo "==> installing torch ($$($(PY) scripts/install_torch.py --constraints $(CONSTRAINTS)))"
	$(PIP_INSTALL) "$$($(PY) scripts/install_torch.py --constraints $(CONSTRAINTS))"
	@echo "==> installing fides-gateway (versions from $(LOCK))"
	$(PIP_INSTALL) setuptools wheel
	$(PIP_INSTALL) --no-build-isolation -e ".[server]"
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	@echo "==> installing test and lint tools"
	$(PIP_INSTALL) --no-build-isolation -e ".[server,dev]"
	@touch $@

# Re-resolve requirements.lock from pyproject.toml against the torch installed in .venv (the one
# install_torch.py chose). Existing pins are kept unless UPGRADE=1; commit the result.
lock: $(VENV)/.installed
	$(PY) -m pip install $(PIP_QUIET) "$(PIP_TOOLS)"
	torch=$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])') \
	  && echo "torch==$$torch" > $(VENV)/lock-torch.txt \
	  && CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --quiet --extra server --extra dev \
	       --all-build-deps --allow-unsafe --strip-extras --no-emit-index-url \
	       --no-emit-find-links --no-emit-trusted-host $(if $(UPGRADE),--upgrade) \
	       --constraint $(VENV)/lock-torch.txt --output-file $(LOCK) pyproject.toml
	@# the local label of a CPU wheel (+cpu) is the machine's business, not the lock's
	sed -i -E 's/^torch==([^+ ]+)\+[^ ]*/torch==\1/' $(LOCK)

# The gRPC messages (gateway/api/oip_grpc/oip_pb2.py and .pyi) from oip.proto, with the protoc
# that grpcio-tools (the lock's version) carries; commit the result.
protos: $(VENV)/.installed-dev
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. gateway/api/oip_grpc/oip.proto

# promtool, amtool (apt-get) and helm-sdkpy (pip) for the deployment checks in tests/deploy
$(VENV)/.deploy-tools: $(VENV)/.installed-dev scripts/install_deploy_tools.sh
	scripts/install_deploy_tools.sh $(PY) $(CONSTRAINTS) $(PIP_QUIET)
	@touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
deploy-tools: $(VENV)/.deploy-tools

# the Helm chart embeds copies of deploy/prometheus/alerts.yml and the Grafana dashboard
sync-deploy:
	$(PY) scripts/sync_deploy_files.py

# The embedded default model repository, built once and cached; rebuilt when its recipe
# changes (the builder or the default experiment).
DEFAULT_RECIPE := fides/defaults/digits.py fides/defaults/nets.py verifier/defaults.py \
	verifier/evaluate.py verifier/gan.py verifier/detector.py verifier/features.py \
	fides/defaults/text.py verifier/lm.py verifier/distillspec.py
$(REPO)/.built: $(DEFAULT_RECIPE) | $(VENV)/.installed
	$(FIDES) models build-default --output $(REPO) --force

models: $(REPO)/.built

# Without FIDES_API_KEYS this starts a development server on loopback only.
run: install models
	@if [ -z "$$FIDES_API_KEYS$$FIDES_API_KEY_FILE" ]; then export FIDES_DEV_MODE=$${FIDES_DEV_MODE:-1}; fi; \
	  FIDES_MODEL_REPOSITORY=$${FIDES_MODEL_REPOSITORY:-$(REPO)} exec $(FIDES) serve

test: install-dev deploy-tools
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/lint-imports  # the layer contracts in pyproject.toml (docs/architecture.md)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install-dev models
	$(FIDES) bench serving --output bench/results/serving.json
	$(FIDES) bench payload --output bench/results/payload.json
	$(FIDES) bench integrity --output bench/results/enclave.json
	$(FIDES) bench speculative --output bench/results/speculative.json
	$(FIDES) bench overload --output bench/results/overload.json
	$(FIDES) bench soak --output bench/results/soak.json

clean:
	rm -rf $(VENV) $(REPO) .pytest_cache .mypy_cache .ruff_cache
