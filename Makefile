# textrefiner — every target bootstraps .venv through `install` when it is missing.
PYTHON := .venv/bin/python
VENV_STAMP := .venv/.installed
# A python given on the command line (make ... PYTHON=python3, e.g. a GPU host's own torch) is used
# as it is: nothing is installed.
ifeq ($(origin PYTHON),command line)
VENV_STAMP :=
endif

# Paper protocols, for any --method (override on the command line: make base2new DATASET=dtd SEED=2),
# your own too: METHOD=path/to/file.py:CLASS or METHOD=module:CLASS. Runs go to $(OUTPUT)/<name>/
# ($(OUTPUT)/<name>-plain/ with REFINER=0: the method without TextRefiner), <name> the METHOD's
# last part (coop, or CLASS).
DATA ?= data
CLIP ?= ViT-B/16
GPUS ?= 1
SEED ?= 1
OUTPUT ?= output
METHOD ?= coop
REFINER ?= 1
TEACHERS ?=
TRAIN_ARGS ?=
EVAL_ARGS ?=
# Cross-dataset targets: the 4 ImageNet variants and the 10 other datasets (or list some).
XD_TARGETS ?= imagenetv2 imagenet_sketch imagenet_a imagenet_r caltech101 oxford_pets stanford_cars \
              oxford_flowers food101 fgvc_aircraft sun397 dtd eurosat ucf101
ifeq ($(GPUS),1)
RUN := $(PYTHON)
else
RUN := $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(GPUS)
endif
RUNS := $(OUTPUT)/$(lastword $(subst :, ,$(METHOD)))$(if $(filter 0,$(REFINER)),-plain)
DEMO := work/demo

.PHONY: install test demo demo-promptkd base2new xd table table-xd table-fewshot table-jobs report gpu-check
install: $(VENV_STAMP)

# Idempotent: re-runs only when requirements.txt changes or .venv is gone.
$(VENV_STAMP): requirements.txt
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(VENV_STAMP)

# tests/conftest.py switches Triton to its CPU interpreter when CUDA is absent.
test: $(VENV_STAMP)
	$(PYTHON) -m pytest -q tests

# The paper's protocols through tables.py (one job here; the whole table below): a finished step is
# skipped (new/ only if it was evaluated from the model base/ tested), an interrupted one resumes.
# GPUS > 1 runs each step under torchrun.
TABLE_FLAGS = --method $(METHOD)$(if $(filter 0,$(REFINER)), --no-refiner)$(if $(TEACHERS), --teacher $(TEACHERS)) \
	--root $(DATA) --clip $(CLIP) --runs $(RUNS) --train-args="$(TRAIN_ARGS)" --eval-args="$(EVAL_ARGS)"
LAUNCH := $(if $(filter-out 1,$(GPUS)),--launcher "$(RUN)")
# FEATURE_STORE=DIR: the evaluation images' frozen-tower features also kept on disk, for later tables.
STORE := $(if $(FEATURE_STORE),--feature-store $(FEATURE_STORE))

# Train on the base classes (a transductive method: on the unlabelled shots of every class), test
# them with the selected model, then test the new classes with the same checkpoint.
base2new: install
	@test -n "$(DATASET)" || { echo "usage: make base2new DATASET=<name> SEED=<n> [METHOD=... TEACHERS=... DATA=... CLIP=... GPUS=...]"; exit 2; }
	@$(PYTHON) tables.py run base2new $(TABLE_FLAGS) --datasets $(DATASET) --seeds $(SEED) $(LAUNCH) $(STORE)

# Cross-dataset with the method's xd recipe (train.py --xd): a transductive method trains a model per
# target on its unlabelled images; the others train once on all ImageNet classes and test every target.
xd: install
	@$(PYTHON) tables.py run xd $(TABLE_FLAGS) --datasets $(XD_TARGETS) --seeds $(SEED) $(LAUNCH) $(STORE)

# Whole tables: every dataset and seed, queued over the GPUs (GPUS=N of them, default every visible
# one; JOBS_PER_GPU jobs at once on each), each worker loading CLIP once; then the report. A failed
# job is listed at the end (exit status 1) and the others go on. table-jobs lists the jobs, one per
# line: `python tables.py run base2new ... --job $$SLURM_ARRAY_TASK_ID` runs one (README: SLURM).
SEEDS ?= 1 2 3
DATASETS ?=
JOBS_PER_GPU ?= 1
TABLE_SELECT = $(if $(DATASETS),--datasets $(DATASETS)) --seeds $(SEEDS)
TABLE_JOBS = $(TABLE_SELECT) --jobs-per-gpu $(JOBS_PER_GPU) $(if $(filter command line,$(origin GPUS)),--gpus $(GPUS))
table: install
	@$(PYTHON) tables.py run base2new $(TABLE_FLAGS) $(TABLE_JOBS) $(STORE)
table-xd: install
	@$(PYTHON) tables.py run xd $(TABLE_FLAGS) $(TABLE_JOBS) $(STORE)
# CoOp's few-shot protocol: SHOTS images of every class (the method's few-shot recipe), every class tested.
SHOTS ?= 1 2 4 8 16
table-fewshot: install
	@$(PYTHON) tables.py run fewshot $(TABLE_FLAGS) $(TABLE_JOBS) --shots $(SHOTS) $(STORE)
table-jobs: install
	@$(PYTHON) tables.py jobs $(or $(PROTOCOL),base2new) $(TABLE_FLAGS) $(TABLE_SELECT) \
	  $(if $(filter fewshot,$(PROTOCOL)),--shots $(SHOTS))

# Every table under OUTPUT, then the methods side by side (<m> beside <m>-plain) in OUTPUT/report.{csv,md,tex,png};
# reads results.json files only (no torch). Fails (status 2) when there is no table, or when a results.json is
# not what its folder says.
report: install
	@$(PYTHON) report.py $(OUTPUT)

# A synthetic CoOp-layout dataset and a tiny random CLIP, then the real base2new flow (it ends with the report):
# 10 classes x 32 images of 32 px, 10 epochs; ~20 s on 2 cores (mostly Python start-ups).
demo: install
	@test -f $(DEMO)/clip.pt || $(PYTHON) bench.py synthetic $(DEMO) --classes 10 --images 32
	@$(MAKE) --no-print-directory base2new DATASET=caltech101 SEED=1 DATA=$(DEMO)/data CLIP=$(DEMO)/clip.pt \
	  OUTPUT=$(DEMO)/output GPUS=1 METHOD=coop REFINER=1 \
	  TRAIN_ARGS="--epochs 10 --batch-size 8 --workers 0 --log-interval 10 --lr 0.01" EVAL_ARGS="--workers 0"
	@echo "Note: this checks the pipeline, not the method. The tiny CLIP has random weights and cannot name"
	@echo "classes it never trained on, so New is at chance level (20% for 5 classes) or below."

# PromptKD + TextRefiner end to end: tiny random student and teacher CLIPs of different widths, a teacher
# file in PromptKD's released format and folder layout (base classes, depth 2), base2new and the report.
DEMO_PKD := work/demo-promptkd
demo-promptkd: install
	@test -f $(DEMO_PKD)/teacher-clip.pt || $(PYTHON) bench.py synthetic $(DEMO_PKD) --classes 6 --images 12 --teacher
	@$(MAKE) --no-print-directory base2new METHOD=promptkd REFINER=1 TEACHERS=$(DEMO_PKD)/teachers DATASET=caltech101 \
	  SEED=1 DATA=$(DEMO_PKD)/data CLIP=$(DEMO_PKD)/clip.pt OUTPUT=$(DEMO_PKD)/output GPUS=1 \
	  TRAIN_ARGS="--teacher-clip $(DEMO_PKD)/teacher-clip.pt --depth 2 --epochs 3 --batch-size 8 --workers 0 --log-interval 10" \
	  EVAL_ARGS="--workers 0"
	@echo "Note: this checks the pipeline, not the method: student and teacher have random weights."

# On a CUDA machine, one prepared run (.ci/gpu-check: the steps, their time limits, the logs) within
# GPU_BUDGET seconds (default 570: one 10-minute device call); exits non-zero if any step fails.
# Needs no .venv; a GPU host with its own torch: make gpu-check GPU_PYTHON=python3
GPU_PYTHON ?= $(PYTHON)
GPU_OUT ?= gpu-results
# The methods of the family-benchmarks step (your own: GPU_METHODS="maple path/to/file.py:CLASS").
GPU_METHODS ?= cocoop kgcoop ivlp maple promptsrc
gpu-check:
	GPU_PYTHON="$(GPU_PYTHON)" GPU_OUT="$(GPU_OUT)" GPU_METHODS="$(GPU_METHODS)" .ci/gpu-check
