# The verbs a user types. `make run` and `make test` work on a fresh machine (Python 3.11, CPU).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-quantize
# dvc.yaml's stage commands are `sdpipe ...`: the virtualenv's scripts come first.
export PATH := $(abspath $(BIN)):$(PATH)

# No telemetry, and no hidden downloads from the Hugging Face hub.
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export MLFLOW_ENABLE_TELEMETRY := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup run test test-fast docs docs-serve ui ui-mlflow ui-prefect deploy services services-stop services-status clean

setup: $(STAMP)

# torch first, pinned, so nothing else picks its build. From PyPI, torch==2.13.0 on Linux is the CUDA build (several
# GB; what a GPU machine wants). For a CPU-only build (a laptop, CI) name PyTorch's CPU index:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (these project machines already hold a CPU wheel of 2.13.0 in pip's find-links, so the default takes it).
TORCH_INDEX ?=
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[test,team]'
	touch $(STAMP)

# the tests also train LoRA on an int8 base (pyproject.toml's `quantize` extra)
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[quantize]'
	touch $(TEST_STAMP)

run: setup
	$(BIN)/dvc repro
	@echo
	@echo "model:        models/sd  (diffusers folder; StableDiffusionPipeline.from_pretrained('models/sd'))"
	@echo "sample grid:  reports/samples.png"
	@echo "metrics:      metrics/eval.json  (dvc metrics show)"
	@cat metrics/registry.json | $(BIN)/python -c "import json,sys; r=json.load(sys.stdin); \
	print(f\"registry:     models:/{r['model_name']}/{r['version']} (champion: version {r['champion_version']})\")"
	@$(BIN)/python -c "import json; print('mlflow run:  ', json.load(open('models/mlflow_run.json'))['run_id'], ' (make ui-mlflow, then open http://127.0.0.1:5000)')"

# Two pytest-xdist workers, a test file each at a time (a file's module fixtures stay in one process; the family
# training file one family at a time: tests/conftest.py's FileOrFamilyScheduling), in tests/conftest.py's order
# (slowest first; xdist would reorder them by their number of tests): on two cores the suite takes about 0.7 of
# its serial time (docs/explanation/results.md). TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(TEST_STAMP)
	$(PYTEST)

test-fast: $(TEST_STAMP)
	$(PYTEST) -m "not e2e"

# The documentation site (docs/, mkdocs.yml): MkDocs + Material from pyproject.toml's `docs` extra, installed on
# first use. --strict fails on a broken link or anchor and on a page outside the navigation; the reference pages
# are generated from the code at every build (docs/hooks/reference.py).
DOCS_STAMP := $(VENV)/.installed-docs
export NO_MKDOCS_2_WARNING := 1
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict

# Serve the site on 127.0.0.1:8000 while writing; it rebuilds on every save.
docs-serve: $(DOCS_STAMP)
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

ui-mlflow: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

ui-prefect: setup
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

# Both UIs in one terminal (Ctrl-C stops both): Prefect on :4200, MLflow on :5000.
ui: setup
	trap 'kill 0' EXIT; $(MAKE) --no-print-directory ui-prefect & $(MAKE) --no-print-directory ui-mlflow & wait

# Serve the train and retrain deployments on the server `make ui` started; the train form's fields start at
# params.yaml's current values (restart after editing params.yaml). With team.env (`make services`): register
# them on the team Prefect server's work pool instead, whose worker runs them.
deploy: setup
	$(if $(wildcard team.env),,PREFECT_API_URL=http://127.0.0.1:4200/api) $(BIN)/python -m flows.deploy

# The team's servers on this machine (docs/guides/team-setup.md): PostgreSQL, S3, MLflow, Prefect and a worker on
# 127.0.0.1, data in .services/, client settings in team.env. Started again, only what is not running starts.
services: setup
	$(BIN)/sdpipe services start

services-stop: setup
	$(BIN)/sdpipe services stop

services-status: setup
	$(BIN)/sdpipe services status

clean:
	rm -rf data/raw data/validated data/processed data/latents models reports metrics mlflow.db mlartifacts site
