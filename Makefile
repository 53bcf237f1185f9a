# textrefiner — every target bootstraps .venv through `install` when it is missing.
PYTHON := .venv/bin/python
VENV_STAMP := .venv/.installed
# A python given on the command line (make ... PYTHON=python3, e.g. a GPU host's own torch)
# is used as it is: nothing is installed.
ifeq ($(origin PYTHON),command line)
VENV_STAMP :=
endif

# Paper protocols (override on the command line: make base2new DATASET=dtd SEED=2 GPUS=4).
DATA ?= data
CLIP ?= ViT-B/16
GPUS ?= 1
SEED ?= 1
OUTPUT ?= output
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
B2N := $(OUTPUT)/base2new/$(DATASET)/seed$(SEED)
XD := $(OUTPUT)/xd
DEMO := work/demo

.PHONY: install test demo base2new xd report gpu-check
install: $(VENV_STAMP)

# Idempotent: re-runs only when requirements.txt changes or .venv is gone.
$(VENV_STAMP): requirements.txt
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(VENV_STAMP)

# tests/conftest.py switches Triton to its CPU interpreter when CUDA is absent.
test: $(VENV_STAMP)
	$(PYTHON) -m pytest -q tests

# Train on the base classes (best-val model tests them), then test the new classes.
# A finished step (its results.json exists) is skipped; an interrupted one resumes.
base2new: install
	@test -n "$(DATASET)" || { echo "usage: make base2new DATASET=<name> SEED=<n> [DATA=... CLIP=... GPUS=...]"; exit 2; }
	@if [ -f $(B2N)/base/results.json ]; then echo "skip: $(B2N)/base is finished"; else \
	  $(RUN) train.py --dataset $(DATASET) --root $(DATA) --clip $(CLIP) --seed $(SEED) \
	    --subsample base --output-dir $(B2N)/base --resume $(TRAIN_ARGS); fi
	@if [ -f $(B2N)/new/results.json ]; then echo "skip: $(B2N)/new is finished"; else \
	  $(RUN) eval.py --checkpoint $(B2N)/base/best.pt --root $(DATA) --clip $(CLIP) \
	    --subsample new --output-dir $(B2N)/new $(EVAL_ARGS); fi

# Train on all ImageNet classes; evaluate the targets with the last-epoch model (no val).
xd: install
	@if [ -f $(XD)/imagenet/seed$(SEED)/results.json ]; then echo "skip: $(XD)/imagenet/seed$(SEED) is finished"; else \
	  $(RUN) train.py --dataset imagenet --root $(DATA) --clip $(CLIP) --seed $(SEED) --no-val \
	    --output-dir $(XD)/imagenet/seed$(SEED) --resume $(TRAIN_ARGS); fi
	@for t in $(XD_ALL); do \
	  if [ -f $(XD)/$$t/seed$(SEED)/results.json ]; then echo "skip: $(XD)/$$t/seed$(SEED) is finished"; else \
	    $(RUN) eval.py --checkpoint $(XD)/imagenet/seed$(SEED)/last.pt --dataset $$t --root $(DATA) \
	      --clip $(CLIP) --output-dir $(XD)/$$t/seed$(SEED) $(EVAL_ARGS) || exit 1; fi; done

# Fails (status 2) when OUTPUT holds neither table, or when a results.json is not what its folder says.
report: install
	@found=; for d in $(OUTPUT)/base2new $(XD); do if [ -d $$d ]; then found=1; \
	  $(PYTHON) eval.py --report $$d || exit 1; echo; fi; done; \
	  test -n "$$found" || { echo "make report: nothing to report: no $(OUTPUT)/base2new or $(XD) (set OUTPUT=...)" >&2; exit 2; }

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

# On a CUDA machine, one prepared run (.ci/gpu-check: the steps, their time limits, the logs):
# versions, the whole suite without the interpreter (GPU-marked tests included), the kernel
# benchmark (its table goes into kernels/README.md), the training/eval throughput benchmarks,
# and short bf16 and fp16 train.py runs on synthetic data. Exits non-zero if any step fails.
# Needs no .venv; a GPU host with its own torch: make gpu-check GPU_PYTHON=python3
GPU_PYTHON ?= $(PYTHON)
GPU_OUT ?= gpu-results
gpu-check:
	GPU_PYTHON="$(GPU_PYTHON)" GPU_OUT="$(GPU_OUT)" .ci/gpu-check
