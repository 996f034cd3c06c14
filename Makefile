# vlprep — the two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
IMAGE_REGISTRY ?= ghcr.io/vlprep
TAG ?= 0.1.0
PIPELINE ?= demo
KFP_HOST ?=
RUN_ARGS ?=

.PHONY: help setup run test test-fast compile images push submit bench lint clean

help:
	@echo "make run       run the demo pipeline locally on the bundled sample (sets itself up)"
	@echo "make test      the whole test suite"
	@echo "make compile   compile every pipeline to pipelines/compiled/*.yaml"
	@echo "make images    docker build + push (IMAGE_REGISTRY=$(IMAGE_REGISTRY) TAG=$(TAG))"
	@echo "make submit    PIPELINE=... KFP_HOST=... [RUN_ARGS='--param k=v']"
	@echo "make bench     benchmarks (ratios against named baselines)"
	@echo "make lint      ruff"
	@echo "make upload    KFP_HOST=... [PIPELINES=...] [VERSION=...]: pipeline versions for the Kubeflow UI"

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# the stamp is refreshed whenever pyproject.toml changes
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/vlprep run demo --local $(RUN_ARGS)

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

compile: setup
	VLPREP_IMAGE_REGISTRY=$(IMAGE_REGISTRY) VLPREP_IMAGE_TAG=$(TAG) $(BIN)/vlprep compile --out pipelines/compiled

images:
	docker build -f images/cpu.Dockerfile -t $(IMAGE_REGISTRY)/vlprep-cpu:$(TAG) .
	docker build -f images/gpu.Dockerfile -t $(IMAGE_REGISTRY)/vlprep-gpu:$(TAG) .
	docker push $(IMAGE_REGISTRY)/vlprep-cpu:$(TAG)
	docker push $(IMAGE_REGISTRY)/vlprep-gpu:$(TAG)

submit: setup
	@test -n "$(KFP_HOST)" || { echo "set KFP_HOST=https://.../pipeline"; exit 1; }
	VLPREP_IMAGE_REGISTRY=$(IMAGE_REGISTRY) VLPREP_IMAGE_TAG=$(TAG) $(BIN)/vlprep submit $(PIPELINE) --host $(KFP_HOST) $(RUN_ARGS)

# every pipeline (or PIPELINES=...) as a version (VERSION=..., default the git commit) of its named pipeline
upload: setup
	@test -n "$(KFP_HOST)" || { echo "set KFP_HOST=https://.../pipeline"; exit 1; }
	VLPREP_IMAGE_REGISTRY=$(IMAGE_REGISTRY) VLPREP_IMAGE_TAG=$(TAG) $(BIN)/vlprep upload $(PIPELINES) --host $(KFP_HOST) $(if $(VERSION),--version $(VERSION))

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: setup
	$(BIN)/ruff check src components pipelines tests bench

clean:
	rm -rf runs .pytest_cache .ruff_cache
