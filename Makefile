# textrefiner — every target bootstraps .venv through `install` when it is missing.
PYTHON := .venv/bin/python
VENV_STAMP := .venv/.installed
# A python given on the command line (make ... PYTHON=python3, e.g. a GPU host's own torch)
# is used as it is: nothing is installed.
ifeq ($(origin PYTHON),command line)
VENV_STAMP :=
endif

# Paper protocols (override on the command line: make base2new DATASET=dtd SEED=2 GPUS=4).
# METHOD=promptkd: PromptKD + TextRefiner, distilled from PromptKD's released teachers in TEACHERS
# (<TEACHERS>/<Name>/VLPromptLearner/model-best.pth.tar per dataset, ImageNet-xd/... for xd);
# its runs go under $(OUTPUT)/promptkd/.
DATA ?= data
CLIP ?= ViT-B/16
GPUS ?= 1
SEED ?= 1
OUTPUT ?= output
METHOD ?= coop
TEACHERS ?= teachers
TRAIN_ARGS ?=
EVAL_ARGS ?=
# The 10 cross-dataset targets; `make xd XD_TARGETS=all` evaluates them all (or list some).
CROSS_DATASETS := caltech101 oxford_pets stanford_cars oxford_flowers food101 fgvc_aircraft sun397 dtd eurosat ucf101
XD_TARGETS ?=
XD_ALL := imagenetv2 imagenet_sketch imagenet_a imagenet_r $(if $(filter all,$(XD_TARGETS)),$(CROSS_DATASETS),$(XD_TARGETS))
ifeq ($(GPUS),1)
RUN := $(PYTHON)
else
RUN := $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(GPUS)
endif
ifeq ($(METHOD),coop)
RUNS := $(OUTPUT)
METHOD_ARGS :=
else ifeq ($(METHOD),promptkd)
RUNS := $(OUTPUT)/promptkd
METHOD_ARGS := --method promptkd --teacher $(TEACHERS)
else
$(error METHOD=$(METHOD): expected coop or promptkd)
endif
B2N := $(RUNS)/base2new/$(DATASET)/seed$(SEED)
XD := $(RUNS)/xd
# PromptKD's cross-dataset protocol trains one student per target (its published table's 10).
PROMPTKD_XD ?= $(CROSS_DATASETS)
DEMO := work/demo

.PHONY: install test demo demo-promptkd base2new xd xd-coop xd-promptkd report gpu-check
install: $(VENV_STAMP)

# Idempotent: re-runs only when requirements.txt changes or .venv is gone.
$(VENV_STAMP): requirements.txt
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(VENV_STAMP)

# tests/conftest.py switches Triton to its CPU interpreter when CUDA is absent.
test: $(VENV_STAMP)
	$(PYTHON) -m pytest -q tests

# Train on the base classes (coop: labelled, the best-val model tests them; promptkd: the
# unlabelled shots of all classes, the epoch of best base-class test accuracy kept, as released),
# then test the new classes with the selected checkpoint (last.pt with --selection last).
# A finished step (its results.json exists) is skipped; an interrupted one resumes.
base2new: install
	@test -n "$(DATASET)" || { echo "usage: make base2new DATASET=<name> SEED=<n> [METHOD=coop|promptkd TEACHERS=... DATA=... CLIP=... GPUS=...]"; exit 2; }
	@if [ -f $(B2N)/base/results.json ]; then echo "skip: $(B2N)/base is finished"; else \
	  $(RUN) train.py $(METHOD_ARGS) --dataset $(DATASET) --root $(DATA) --clip $(CLIP) --seed $(SEED) \
	    --subsample base --output-dir $(B2N)/base --resume $(TRAIN_ARGS); fi
	@if [ -f $(B2N)/new/results.json ]; then echo "skip: $(B2N)/new is finished"; else \
	  ckpt=$(B2N)/base/best.pt; test -f $$ckpt || ckpt=$(B2N)/base/last.pt; \
	  $(RUN) eval.py --checkpoint $$ckpt --root $(DATA) --clip $(CLIP) \
	    --subsample new --output-dir $(B2N)/new $(EVAL_ARGS); fi

xd: xd-$(METHOD)

# CoOp: train on all ImageNet classes; evaluate the targets with the last-epoch model (no val).
xd-coop: install
	@if [ -f $(XD)/imagenet/seed$(SEED)/results.json ]; then echo "skip: $(XD)/imagenet/seed$(SEED) is finished"; else \
	  $(RUN) train.py --dataset imagenet --root $(DATA) --clip $(CLIP) --seed $(SEED) --no-val \
	    --output-dir $(XD)/imagenet/seed$(SEED) --resume $(TRAIN_ARGS); fi
	@for t in $(XD_ALL); do \
	  if [ -f $(XD)/$$t/seed$(SEED)/results.json ]; then echo "skip: $(XD)/$$t/seed$(SEED) is finished"; else \
	    $(RUN) eval.py --checkpoint $(XD)/imagenet/seed$(SEED)/last.pt --dataset $$t --root $(DATA) \
	      --clip $(CLIP) --output-dir $(XD)/$$t/seed$(SEED) $(EVAL_ARGS) || exit 1; fi; done

# PromptKD (transductive, as released): per target a depth-3 student distilled from the ImageNet-xd
# teacher on the target's whole unlabelled train split (a test-only ImageNet variant: its test
# images), tested on its test split.
xd-promptkd: install
	@for t in $(PROMPTKD_XD); do \
	  if [ -f $(XD)/$$t/seed$(SEED)/results.json ]; then echo "skip: $(XD)/$$t/seed$(SEED) is finished"; else \
	    $(RUN) train.py $(METHOD_ARGS) --dataset $$t --root $(DATA) --clip $(CLIP) --seed $(SEED) --subsample all \
	      --shots 0 --depth 3 --output-dir $(XD)/$$t/seed$(SEED) --resume $(TRAIN_ARGS) || exit 1; fi; done

# Fails (status 2) when OUTPUT holds neither table, or when a results.json is not what its folder says.
report: install
	@found=; for d in $(OUTPUT)/base2new $(OUTPUT)/xd $(OUTPUT)/promptkd/base2new $(OUTPUT)/promptkd/xd; do if [ -d $$d ]; then found=1; \
	  $(PYTHON) eval.py --report $$d || exit 1; echo; fi; done; \
	  test -n "$$found" || { echo "make report: nothing to report: no $(OUTPUT)/base2new, $(OUTPUT)/xd or $(OUTPUT)/promptkd/{base2new,xd} (set OUTPUT=...)" >&2; exit 2; }

# Synthetic CoOp-layout dataset + tiny random CLIP, then the real base2new flow and report.
# 10 classes x 32 images (16 shots to train on) and 10 epochs: enough for the base accuracy
# to rise well above chance, still ~20 s on 2 cores (mostly four Python start-ups).
demo: install
	@test -f $(DEMO)/tiny-clip.pt || $(PYTHON) -c "import torch, clip_model, data; \
	  data.write_synthetic_dataset('$(DEMO)/data', 'caltech101', num_classes=10, images_per_class=32, image_size=32); \
	  torch.save(clip_model.random_state_dict(clip_model.CONFIGS['tiny']), '$(DEMO)/tiny-clip.pt')"
	@$(MAKE) --no-print-directory base2new DATASET=caltech101 SEED=1 DATA=$(DEMO)/data \
	  CLIP=$(DEMO)/tiny-clip.pt OUTPUT=$(DEMO)/output GPUS=1 \
	  TRAIN_ARGS="--epochs 10 --batch-size 8 --workers 0 --log-interval 10 --lr 0.01" EVAL_ARGS="--workers 0"
	@$(PYTHON) eval.py --report $(DEMO)/output/base2new
	@echo "Note: this checks the pipeline, not the method. The tiny CLIP has random weights and cannot name"
	@echo "classes it never trained on, so New is at chance level (20% for 5 classes) or below."

# PromptKD + TextRefiner end to end: tiny random student and teacher CLIPs of different widths, a
# teacher file written in PromptKD's released format (base classes, depth 2) in the released
# folder layout, then make base2new METHOD=promptkd and the report.
DEMO_PKD := work/demo-promptkd
demo-promptkd: install
	@test -f $(DEMO_PKD)/teachers/Caltech101/VLPromptLearner/model-best.pth.tar || $(PYTHON) -c "import os, torch, clip_model, data, textrefiner; \
	  data.write_synthetic_dataset('$(DEMO_PKD)/data', 'caltech101', num_classes=6, images_per_class=12, image_size=32); \
	  torch.save(clip_model.random_state_dict(clip_model.CONFIGS['tiny']), '$(DEMO_PKD)/student-clip.pt'); \
	  teacher = clip_model.random_state_dict(clip_model.CONFIGS['tiny-teacher'], seed=1); \
	  torch.save(teacher, '$(DEMO_PKD)/teacher-clip.pt'); \
	  base = data.load_splits('caltech101', '$(DEMO_PKD)/data', subsample='base')['classnames']; \
	  os.makedirs('$(DEMO_PKD)/teachers/Caltech101/VLPromptLearner', exist_ok=True); \
	  textrefiner.write_teacher_checkpoint('$(DEMO_PKD)/teachers/Caltech101/VLPromptLearner/model-best.pth.tar', teacher, base, depth=2)"
	@$(MAKE) --no-print-directory base2new METHOD=promptkd TEACHERS=$(DEMO_PKD)/teachers DATASET=caltech101 SEED=1 \
	  DATA=$(DEMO_PKD)/data CLIP=$(DEMO_PKD)/student-clip.pt OUTPUT=$(DEMO_PKD)/output GPUS=1 \
	  TRAIN_ARGS="--teacher-clip $(DEMO_PKD)/teacher-clip.pt --depth 2 --epochs 3 --batch-size 8 --workers 0 --log-interval 10" \
	  EVAL_ARGS="--workers 0"
	@$(PYTHON) eval.py --report $(DEMO_PKD)/output/promptkd/base2new
	@echo "Note: this checks the pipeline, not the method: student and teacher have random weights."

# On a CUDA machine, one prepared run (.ci/gpu-check: the steps, their time limits, the logs):
# versions, the whole suite without the interpreter (GPU-marked tests included), the kernel
# benchmark (its table goes into kernels/README.md), the training/eval throughput benchmarks,
# a whole bf16 --benchmark-run and a short fp16 train.py run on synthetic data, all within
# GPU_BUDGET seconds (default 570: one 10-minute device call). Exits non-zero if any step fails.
# Needs no .venv; a GPU host with its own torch: make gpu-check GPU_PYTHON=python3
GPU_PYTHON ?= $(PYTHON)
GPU_OUT ?= gpu-results
gpu-check:
	GPU_PYTHON="$(GPU_PYTHON)" GPU_OUT="$(GPU_OUT)" .ci/gpu-check
