# A newcomer's two commands: `make run` and `make test`. Both create .venv on first use.
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
# DVC runs each stage's `mpad ...` command in a shell: put the project's venv first on its PATH.
export PATH := $(abspath $(BIN)):$(PATH)

# `make offline` / `make ablations PRESET=offline`: the overrides in presets/offline.txt, as -S arguments.
PRESET_ARGS = $(if $(PRESET),$(foreach p,$(shell grep -v '^\#' presets/$(PRESET).txt),-S '$(p)'))
# The paper's comparisons (Table 1's hand-written prompts, Tables 2-4) plus the memory branch; the last one is
# the full method, so params.yaml
# ends where it started. Each run sets every ablated knob, since `dvc exp run` leaves params.yaml as it ran.
META_EPOCHS ?= 3
LAA_K ?= 2
# Textures' object mask in every arm (README, "Table 3 on textures"): `whole` makes no-oagm equal full there.
TEXTURE_MASK ?= mask_method
ABLATIONS := \
	human-prompts:mpts.meta_epochs=0,mpts.lambda=1,oagm.enabled=true,oagm.texture_mask=$(TEXTURE_MASK),laa.attention=vv,laa.k=$(LAA_K),memory.enabled=false \
	lambda-0:mpts.meta_epochs=$(META_EPOCHS),mpts.lambda=0,oagm.enabled=true,oagm.texture_mask=$(TEXTURE_MASK),laa.attention=vv,laa.k=$(LAA_K),memory.enabled=false \
	lambda-0.5:mpts.meta_epochs=$(META_EPOCHS),mpts.lambda=0.5,oagm.enabled=true,oagm.texture_mask=$(TEXTURE_MASK),laa.attention=vv,laa.k=$(LAA_K),memory.enabled=false \
	no-oagm:mpts.meta_epochs=$(META_EPOCHS),mpts.lambda=1,oagm.enabled=false,oagm.texture_mask=$(TEXTURE_MASK),laa.attention=vv,laa.k=$(LAA_K),memory.enabled=false \
	vv-att:mpts.meta_epochs=$(META_EPOCHS),mpts.lambda=1,oagm.enabled=true,oagm.texture_mask=$(TEXTURE_MASK),laa.attention=vv,laa.k=0,memory.enabled=false \
	qk-laa:mpts.meta_epochs=$(META_EPOCHS),mpts.lambda=1,oagm.enabled=true,oagm.texture_mask=$(TEXTURE_MASK),laa.attention=qk,laa.k=$(LAA_K),memory.enabled=false \
	memory:mpts.meta_epochs=$(META_EPOCHS),mpts.lambda=1,oagm.enabled=true,oagm.texture_mask=$(TEXTURE_MASK),laa.attention=vv,laa.k=$(LAA_K),memory.enabled=true \
	full:mpts.meta_epochs=$(META_EPOCHS),mpts.lambda=1,oagm.enabled=true,oagm.texture_mask=$(TEXTURE_MASK),laa.attention=vv,laa.k=$(LAA_K),memory.enabled=false

.PHONY: setup run offline ablations sweep plots compare test test-fast bench gpu-wheels gpu-dry

$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev,export,serve]'
	touch $(STAMP)

setup: $(STAMP)

# The main job: the pipeline with params.yaml as it is (by default the paper's setting where the paper gives one).
# `mpad check` first: a value DVC cannot expand (dataset.categories: null) would stop DVC with its own traceback.
# JOBS=1 (default): `dvc repro`. JOBS=N > 1: the categories' stages in N concurrent `dvc repro` processes,
# fetch once before and summarize once after (mpad/parallel.py).
run: $(STAMP)
	$(BIN)/mpad check
	$(if $(filter-out 1,$(JOBS)),$(BIN)/python -m mpad.parallel --jobs $(JOBS),$(BIN)/dvc repro)

# The offline preset as a DVC experiment (generated data, tiny random-weight model; no network). JOBS=N > 1:
# the preset written to params.yaml as `dvc exp run -S` does, the run of `make run JOBS=N`, then `dvc exp save`.
OFFLINE_SETS = $(foreach p,$(shell grep -v '^\#' presets/offline.txt),-S '$(p)')
offline: $(STAMP)
	-$(BIN)/dvc exp remove -q offline 2>/dev/null
	$(if $(filter-out 1,$(JOBS)),$(BIN)/python -m mpad.parallel --jobs $(JOBS) $(OFFLINE_SETS) && \
	  $(BIN)/dvc exp save -f -n offline,$(BIN)/dvc exp run -n offline $(OFFLINE_SETS))
	cat metrics.md

# The ablations as named DVC experiments. JOBS=1 (default): one after another in the workspace. JOBS=N > 1: queued
# (`dvc exp run --queue`) and run by N parallel DVC queue workers (`dvc queue start -j N`), each in a temporary copy
# that reads the workspace's dataset (mpad.workspace); the synthetic dataset is generated once, under a lock.
# An experiment of the same name is replaced (`exp run --force` would also re-run every stage).
# SEEDS=0,1,2: each arm once per seed s, named <arm>-s<s>, with shots.seed, oagm.seed and mpts.seed all set to s.
JOBS ?= 1
comma := ,
SEED_KEYS := shots.seed oagm.seed mpts.seed
# N queue workers with the cores shared among their torch threads (unless OMP_NUM_THREADS is set: README,
# busy cores); wait until the queue is empty; fail if a run failed (`dvc queue logs <name>` says why).
RUN_QUEUE = OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(( $$(nproc) > $(JOBS) ? $$(nproc) / $(JOBS) : 1 ))} \
	  $(BIN)/dvc queue start -j $(JOBS) && \
	  while $(BIN)/dvc queue status | grep -qE 'Queued|Running'; do sleep 10; done; \
	  $(BIN)/dvc queue status; ! $(BIN)/dvc queue status | grep -q Failed
ablations: $(STAMP)
	$(if $(PRESET),,$(BIN)/mpad check)
	$(if $(filter-out 1,$(JOBS)),$(if $(PRESET),,$(BIN)/dvc repro fetch))
	$(if $(filter-out 1,$(JOBS)),$(BIN)/dvc queue remove -q --all)
	set -e; for spec in $(ABLATIONS); do \
	  arm=$${spec%%:*}; sets=""; \
	  for kv in $$(echo $${spec#*:} | tr ',' ' '); do sets="$$sets -S $$kv"; done; \
	  for seed in $(or $(subst $(comma), ,$(SEEDS)),-); do \
	    name=$$arm; seeds=""; \
	    if [ "$$seed" != - ]; then name=$$arm-s$$seed; seeds="$(foreach k,$(SEED_KEYS),-S $(k)=$$seed)"; fi; \
	    echo "== experiment $$name"; \
	    $(BIN)/dvc exp remove -q $$name 2>/dev/null || true; \
	    $(BIN)/dvc exp run $(if $(filter-out 1,$(JOBS)),--queue) -n $$name $(PRESET_ARGS) $$sets $$seeds; \
	  done; \
	done
	$(if $(filter-out 1,$(JOBS)),$(RUN_QUEUE))
	$(MAKE) --no-print-directory compare

# shots.k x shots.seed as DVC experiments (mpad/sweep.py): the grid points without a run of the current params and
# code are queued with DVC's grid syntax (all of them: -S 'shots.k=1,2,4' -S 'shots.seed=0,1,2') and run by JOBS
# workers; then sweep.md (a table per k: mean ± std, min-max over seeds) and sweep.json. Nothing missing: no run.
SHOTS ?= 1,2,4
SWEEP_ARGS = --shots $(SHOTS) --seeds $(if $(SEEDS),$(SEEDS),0,1,2) $(if $(PRESET),--preset presets/$(PRESET).txt)
sweep: $(STAMP)
	$(if $(PRESET),,$(BIN)/mpad check && $(BIN)/dvc repro fetch)
	set -e; plan=$$($(BIN)/python -m mpad.sweep plan $(SWEEP_ARGS)); \
	if [ -z "$$plan" ]; then echo "every grid point has a run of these params and this code: nothing to run"; else \
	  $(BIN)/dvc queue remove -q --all; \
	  echo "$$plan" | while read -r sets; do \
	    echo "dvc exp run --queue $$sets"; eval "set -- $$sets"; $(BIN)/dvc exp run --queue $(PRESET_ARGS) "$$@"; \
	  done; \
	  $(RUN_QUEUE); \
	fi
	$(BIN)/python -m mpad.sweep report $(SWEEP_ARGS)

# Experiments x the params that differ between them x mean metrics, under 120 characters a line
# (`dvc exp show` itself prints every metrics file, param and dependency hash).
compare: $(STAMP)
	$(BIN)/dvc exp show --json | $(BIN)/python -m mpad.experiments

# PNG pictures that open without network (dvc_plots/index.html loads vega from a CDN): figures/curves.png
# (ROC, PRO), figures/training.png (MPTS curves), figures/ablation_pixel_auroc.png (the experiments).
plots: $(STAMP)
	mkdir -p figures && $(BIN)/dvc exp show --json > figures/experiments.json
	$(BIN)/mpad plots --experiments figures/experiments.json --out figures

# The whole suite on 2 pytest-xdist workers (one torch thread each, tests/conftest.py), each test module on one
# worker (its module-scoped runs made once); then the tests marked `numerics` (tolerances that depend on the CPU's
# kernels) once more on torch's scalar kernels, so that CI sees two kernel sets on any x86-64 CPU (tests/conftest.py
# holds oneDNN to AVX2 in that pass, as on a CPU without avx512).
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadscope
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST)
	ATEN_CPU_CAPABILITY=default $(PYTEST) -m numerics

# The quick loop while developing: everything but the end-to-end DVC runs (marker `slow`), one kernel set.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST) -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/encoder.py

# The GPU check (bench/gpu_check.sh): the wheels the GPU machine lacks, for Python 3.12, into .whl/ (git-ignored).
gpu-wheels: $(STAMP)
	PIP="$(BIN)/python -m pip" bench/gpu_wheels.sh .whl 3.12

# Its dry run here on the CPU, in a Python that sees only the GPU image's packages plus the wheels (for
# this Python's version), from a clean copy of the checkout's files.
GPU_DRY := /tmp/mpad-gpu-dry
gpu-dry: $(STAMP)
	rm -rf $(GPU_DRY) && mkdir -p $(GPU_DRY)/src
	git ls-files -co --exclude-standard | grep -v '^data/' | tar -cf - -T - | tar -xf - -C $(GPU_DRY)/src
	$(BIN)/python bench/gpu_like_env.py $(GPU_DRY) bench/gpu_packages.txt
	PIP="$(BIN)/python -m pip" bench/gpu_wheels.sh $(GPU_DRY)/whl $$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
	cd $(GPU_DRY)/src && DEVICE=cpu PYTHON=$(GPU_DRY)/env/bin/python WHEELS=$(GPU_DRY)/whl OUT=$(GPU_DRY)/out bench/gpu_check.sh

# The Ray backend on a simulated 2-node cluster against `make offline JOBS=2` (bench/cluster.py; minutes).
.PHONY: bench-cluster
bench-cluster: $(STAMP)
	$(BIN)/python bench/cluster.py
