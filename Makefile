# vlprep — the two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# images: one per stage (images/Dockerfile); the committed pipelines/compiled/*.yaml name the defaults
DEFAULT_REGISTRY := ghcr.io/vlprep
DEFAULT_TAG := 0.1.0
IMAGE_REGISTRY ?= $(DEFAULT_REGISTRY)
TAG ?= $(DEFAULT_TAG)
STAGES := captions regions context xlxmert vokens
PIPELINE ?= demo
KFP_HOST ?=
RUN_ARGS ?=
DEVICE ?= cuda

.PHONY: help setup run test test-fast test-containers compile images push lock submit bench gpu-check lint clean

help:
	@echo "make run       run the demo pipeline locally on the bundled sample (sets itself up)"
	@echo "make test      the whole test suite (no Docker needed)"
	@echo "make test-containers  build the images, run the components in them (Docker; starts the engine)"
	@echo "make compile   compile every pipeline to pipelines/compiled/*.yaml"
	@echo "make images    build $(IMAGE_REGISTRY)/vlprep-STAGE:$(TAG) for STAGE in $(STAGES)"
	@echo "make push      push them to IMAGE_REGISTRY"
	@echo "make lock      regenerate images/locks/ after changing a dependency in pyproject.toml"
	@echo "make submit    PIPELINE=... KFP_HOST=... [RUN_ARGS='--param k=v']"
	@echo "make bench     benchmarks (ratios against named baselines)"
	@echo "make gpu-check every CUDA path once, throughput per stage (DEVICE=cpu: small, on the CPU)"
	@echo "make lint      ruff"
	@echo "make upload    KFP_HOST=... [PIPELINES=...] [VERSION=...]: pipeline versions for the Kubeflow UI"

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# the stamp is refreshed whenever pyproject.toml changes
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,test]'
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

# BASE=... picks the base image, FAISS=... a GPU faiss (see images/Dockerfile); starts Docker if needed
images:
	bash images/build.sh $(IMAGE_REGISTRY) $(TAG) $(STAGES)

push: images
	@for s in $(STAGES); do docker push $(IMAGE_REGISTRY)/vlprep-$$s:$(TAG) || exit 1; done

lock: setup
	$(BIN)/python images/lock.py

# the images the committed compiled pipelines name; fails (not skips) when Docker cannot be started
test-containers: setup
	$(MAKE) images IMAGE_REGISTRY=$(DEFAULT_REGISTRY) TAG=$(DEFAULT_TAG)
	$(BIN)/python -m pytest -q --containers -m containers tests

submit: setup
	@test -n "$(KFP_HOST)" || { echo "set KFP_HOST=https://.../pipeline"; exit 1; }
	VLPREP_IMAGE_REGISTRY=$(IMAGE_REGISTRY) VLPREP_IMAGE_TAG=$(TAG) $(BIN)/vlprep submit $(PIPELINE) --host $(KFP_HOST) $(RUN_ARGS)

# every pipeline (or PIPELINES=...) as a version (VERSION=..., default the git commit) of its named pipeline
upload: setup
	@test -n "$(KFP_HOST)" || { echo "set KFP_HOST=https://.../pipeline"; exit 1; }
	VLPREP_IMAGE_REGISTRY=$(IMAGE_REGISTRY) VLPREP_IMAGE_TAG=$(TAG) $(BIN)/vlprep upload $(PIPELINES) --host $(KFP_HOST) $(if $(VERSION),--version $(VERSION))

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# every CUDA path once with throughput per stage (< 10 min on one GPU); DEVICE=cpu runs them small
gpu-check: setup
	$(BIN)/python bench/gpu_check.py --device $(DEVICE) $(if $(filter cpu,$(DEVICE)),--quick)

lint: setup
	$(BIN)/ruff check src components pipelines tests bench

clean:
	rm -rf runs .pytest_cache .ruff_cache
