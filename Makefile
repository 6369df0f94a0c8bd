# A newcomer's two commands: `make run` and `make test`. Both create .venv on first use.
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
# DVC runs each stage's `mpad ...` command in a shell: put the project's venv first on its PATH.
export PATH := $(abspath $(BIN)):$(PATH)

BENCHES := encoder evaluate export fullscale serve peers cluster

.PHONY: setup run offline ablations sweep plots compare docs test test-fast bench $(addprefix bench-,$(BENCHES)) gpu-wheels gpu-dry

$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev,export,serve]'
	touch $(STAMP)

setup: $(STAMP)

# The runs (`mpad exp`, mpad/runs/): each argument is checked before anything changes (a bad one: one line, exit 2);
# Ctrl-C stops every process a run started and says what finished; a re-run runs only what is missing.
# run: the pipeline on params.yaml (`mpad check` first). JOBS=1 (default): `dvc repro`; JOBS=N > 1: the categories'
#   stages in N concurrent `dvc repro` processes, fetch once before and summarize once after (mpad/runs/units.py).
# offline: the offline preset (presets/offline.txt: generated data, tiny random-weight model) as the experiment
#   `offline`, then metrics.md.
# ablations: the arms of presets/ablations.yaml as named experiments on JOBS DVC queue workers (SEEDS=0,1,2: each
#   arm per seed, <arm>-s<seed>), those without a run of their params and code; then `make compare`'s table.
# sweep: shots.k x shots.seed (SHOTS=1,2,4, SEEDS=0,1,2) as experiments, those without a run; then sweep.md (a table
#   per k: mean ± std, min-max over seeds) and sweep.json.
# PRESET=NAME: presets/NAME.txt's overrides in every experiment. CLUSTER=ADDRESS: the units on a Ray cluster.
JOBS ?= 1
EXP = $(BIN)/mpad exp $@ --jobs '$(JOBS)' $(if $(CLUSTER),--cluster '$(CLUSTER)')
run offline: $(STAMP)
	$(EXP)
ablations: $(STAMP)
	$(EXP) $(if $(PRESET),--preset '$(PRESET)') $(if $(SEEDS),--seeds '$(SEEDS)')
sweep: $(STAMP)
	$(EXP) $(if $(PRESET),--preset '$(PRESET)') $(if $(SHOTS),--shots '$(SHOTS)') $(if $(SEEDS),--seeds '$(SEEDS)')

# Experiments x the params that differ between them x mean metrics, under 120 characters a line
# (`dvc exp show` itself prints every metrics file, param and dependency hash).
compare: $(STAMP)
	$(BIN)/mpad exp compare

# PNG pictures that open without network (dvc_plots/index.html loads vega from a CDN): figures/curves.png
# (ROC, PRO), figures/training.png (MPTS curves), figures/ablation_pixel_auroc.png (the experiments).
plots: $(STAMP)
	mkdir -p figures && $(BIN)/dvc exp show --json > figures/experiments.json
	$(BIN)/mpad plots --experiments figures/experiments.json --out figures

# The documentation site (mkdocs.yml, docs/*.md) as HTML in site/ (git-ignored); no network needed (`font: false`).
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build  # not -q: it hides the warnings that --strict counts
docs: $(STAMP)
	$(MKDOCS) --strict

# The whole suite on 2 pytest-xdist workers (one torch thread each, tests/conftest.py), each test module on one
# worker (its module-scoped runs made once); then the tests marked `numerics` (tolerances that depend on the CPU's
# kernels) once more on torch's scalar kernels, so that CI sees two kernel sets on any x86-64 CPU (tests/conftest.py
# holds oneDNN to AVX2 in that pass, as on a CPU without avx512). First the site's strict build (`make docs`):
# a broken link or a page missing from mkdocs.yml's nav fails the suite.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadscope
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MKDOCS) --strict
	$(PYTEST)
	ATEN_CPU_CAPABILITY=default $(PYTEST) -m numerics

# The quick loop while developing: everything but the end-to-end DVC runs (marker `slow`), one kernel set.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST) -m "not slow"

# The lasting benchmarks (docs/benchmarks.md): `make bench` lists them with what each measures (its docstring's
# first line); `make bench-<name> ARGS="..."` runs bench/<name>.py with those arguments (`--help` lists them).
bench:
	@for b in $(BENCHES); do \
	  printf 'make bench-%-10s %s\n' "$$b" "$$(sed -n '1s/^"""//p' bench/$$b.py 2>/dev/null || echo '(missing)')"; \
	done
	@echo 'make gpu-dry          the GPU check (bench/gpu_check.sh) dry-run on the CPU'

$(addprefix bench-,$(BENCHES)): bench-%: $(STAMP)
	$(BIN)/python bench/$*.py $(ARGS)

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
