#!/usr/bin/env python
"""Write the reference files of this folder: what the OFFICIAL CoCoOp, KgCoOp, IVLP, MaPLe and
PromptSRC trainers compute on a tiny random CLIP, in fp32 (README.md here says what they hold).

    python tests/reference/generate.py --coop CoOp --kgcoop KgCoOp \
        --maple multimodal-prompt-learning --promptsrc PromptSRC [--out tests/reference]

Each argument is a checkout of the official repository (commits in OFFICIAL). Nothing of it is
copied here: every method runs in its own Python process (the repositories' `clip` packages
differ) that imports the checkout, a small Dassl stand-in written below, and the run-time
patches listed in PATCHES / install_runtime_patches. Needs torch, torchvision, ftfy, regex,
yacs, tqdm, pillow; no GPU, no network.
"""
import argparse
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import types
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent

# ----------------------------------------------------------------------------- what is run

OFFICIAL = {
    "cocoop": dict(arg="coop", repo="KaiyangZhou/CoOp", commit="ff61507c790454bce7c5052c3ac39e60772f1f89",
                   subdir="", file="trainers/cocoop.py", trainer="CoCoOp"),
    "kgcoop": dict(arg="kgcoop", repo="htyao89/KgCoOp", commit="c43ccc32c8739f64b165cfa205fcc6c0f5bb5b17",
                   subdir="KgCoOp", file="trainers/kgcoop.py", trainer="KgCoOp"),
    "ivlp": dict(arg="promptsrc", repo="muzairkhattak/PromptSRC", commit="bb95c77b634d63488f2cad81ff4a72d53bdd06d5",
                 subdir="", file="trainers/independentVL.py", trainer="IVLP"),
    "maple": dict(arg="maple", repo="muzairkhattak/multimodal-prompt-learning",
                  commit="69bce21ae8eda80ad6187534b2dce09cf6c59e17", subdir="", file="trainers/maple.py",
                  trainer="MaPLe"),
    "promptsrc": dict(arg="promptsrc", repo="muzairkhattak/PromptSRC",
                      commit="bb95c77b634d63488f2cad81ff4a72d53bdd06d5", subdir="", file="trainers/promptsrc.py",
                      trainer="PromptSRC"),
}
# SHA-256 of the files the patches and the results depend on, at those commits.
SNAPSHOT_SHA256 = {
    "cocoop": {"trainers/cocoop.py": "90c7b866d59bce0fd825fa099ab03606d72ef9965bbf5d9cee20729728d1bc84",
               "clip/model.py": "c0ba5cb62eafbf21e6c4e861e9caf6933d1c7e82313d37f953cd2c1ae85f78de"},
    "kgcoop": {"trainers/kgcoop.py": "cd1d2dc7bb59375ecab2b25a12ea4e35106647309339be035a23a3b8ba40c616",
               "clip/model.py": "936e0a8cff52b62d4f92fcba34da3dc6c3476a1699008671a87cd5252840d6d6"},
    "ivlp": {"trainers/independentVL.py": "74642ea02ff90a1f6b24f39e43d5c65a28f0d25973e9c511c3655c58eb931e57",
             "clip/model.py": "456cd075ebf55fbca1d2209a14dc458c12d9d5ff9f2bcd36ee676a034f90d299"},
    "maple": {"trainers/maple.py": "e067414c25e87a7ea40b9ec399fd13f655fe38a5f205e3bc5a5ce74a78a761b0",
              "clip/model.py": "ed1d99ad58b1946a0ea0dcdea5de694eefb90d09941001c0dc954b30219d1687"},
    "promptsrc": {"trainers/promptsrc.py": "36d5703d653aee910d345e74701bb1dc911d7df54e8638a950e2c7831df945d2",
                  "clip/model.py": "456cd075ebf55fbca1d2209a14dc458c12d9d5ff9f2bcd36ee676a034f90d299"},
}

# In-memory source substitutions (old, new, expected count), applied when the module is imported.
# All of them turn a hard-coded fp16 cast into a cast to the dtype the surrounding code already
# uses: identical in the official fp16 runs, a no-op in the fp32 runs made here.
_PROMPT_CASTS = [
    (".permute(1, 0, 2).half()", ".permute(1, 0, 2).type(x.dtype)", 4),  # deep prompts, IVLP + MaPLe blocks
    ("self.VPT.expand(x.shape[0], -1, -1).half()", "self.VPT.expand(x.shape[0], -1, -1).type(x.dtype)", 1),
    ("shared_ctx.expand(x.shape[0], -1, -1).half()", "shared_ctx.expand(x.shape[0], -1, -1).type(x.dtype)", 1),
]
PATCHES = {
    "cocoop": {},
    "kgcoop": {},
    "ivlp": {"clip.model": _PROMPT_CASTS},
    "maple": {"clip.model": _PROMPT_CASTS, "trainers.maple": [("self.proj.half()", "self.proj.to(dtype)", 1)]},
    "promptsrc": {"clip.model": _PROMPT_CASTS,
                  "trainers.promptsrc": [("fixed_embeddings.half()", "fixed_embeddings.type(self.dtype)", 1)]},
}

CLIP_SEED, DATA_SEED, INIT_SEED = 0, 1, 2
CLIP_CONFIG = dict(embed_dim=512, image_resolution=64, vision_layers=3, vision_width=768, vision_patch_size=16,
                   context_length=77, vocab_size=49408, transformer_width=512, transformer_layers=3)
DEPTH = 3  # prompt depth of ivlp / maple / promptsrc here (the base2new recipes use 9)
CLASSNAMES = ["abyssinian cat", "beagle", "great_pyrenees"]
DATASET, DASSL_DATASET = "oxford_pets", "OxfordPets"
BATCH, N_EVAL = 2, 3

# Dassl's SGD defaults and each method's base2new recipe (prompt depth DEPTH instead of 9).
OPTIM = dict(NAME="sgd", MOMENTUM=0.9, WEIGHT_DECAY=5e-4, LR_SCHEDULER="cosine", WARMUP_EPOCH=1,
             WARMUP_TYPE="constant", WARMUP_CONS_LR=1e-5)
RECIPES = {
    "cocoop": dict(LR=0.002, MAX_EPOCH=10, batch_size=1,
                   node="COCOOP", trainer=dict(N_CTX=4, CTX_INIT="a photo of a", PREC="fp32")),
    "kgcoop": dict(LR=0.002, MAX_EPOCH=100, batch_size=128,
                   node="COOP", trainer=dict(N_CTX=4, CSC=False, CTX_INIT=True, W=8.0, PREC="fp32",
                                             CLASS_TOKEN_POSITION="end")),
    "ivlp": dict(LR=0.0025, MAX_EPOCH=20, batch_size=4,
                 node="IVLP", trainer=dict(N_CTX_VISION=4, N_CTX_TEXT=4, CTX_INIT="a photo of a", PREC="fp32",
                                           PROMPT_DEPTH_VISION=DEPTH, PROMPT_DEPTH_TEXT=DEPTH)),
    "maple": dict(LR=0.0035, MAX_EPOCH=5, batch_size=4,
                  node="MAPLE", trainer=dict(N_CTX=2, CTX_INIT="a photo of a", PREC="fp32", PROMPT_DEPTH=DEPTH)),
    "promptsrc": dict(LR=0.0025, MAX_EPOCH=20, batch_size=4,
                      node="PROMPTSRC", trainer=dict(N_CTX_VISION=4, N_CTX_TEXT=4, CTX_INIT="a photo of a",
                                                     PREC="fp32", PROMPT_DEPTH_VISION=DEPTH,
                                                     PROMPT_DEPTH_TEXT=DEPTH, TEXT_LOSS_WEIGHT=25,
                                                     IMAGE_LOSS_WEIGHT=10, GPA_MEAN=15, GPA_STD=1)),
}
DEPTH_KEYS = ("PROMPT_DEPTH", "PROMPT_DEPTH_VISION", "PROMPT_DEPTH_TEXT")
GPA_SIM = dict(mu=2, sigma=1, epochs=3, step=0.01)  # theta_k = init + step * k * S, S = +1 -1 +1 ... (flat order)


# ----------------------------------------------------------------------------- Dassl stand-in

def install_dassl_stub():
    """The parts of Dassl the five trainers import, with Dassl's semantics, except that no
    optimiser step is ever taken: the gradients of one step are what we record."""

    class Registry:
        def __init__(self):
            self.items = {}

        def register(self):
            def add(cls):
                self.items[cls.__name__] = cls
                return cls
            return add

    class NoStepSGD(torch.optim.SGD):
        def step(self, closure=None):  # the official forward_backward calls it; we keep the grads
            return None

    class NoScheduler:
        def step(self):
            return None

    class TrainerX:
        def register_model(self, name="model", model=None, optim=None, sched=None):
            for attr in ("_models", "_optims", "_scheds"):
                if not hasattr(self, attr):
                    setattr(self, attr, OrderedDict())
            self._models[name], self._optims[name], self._scheds[name] = model, optim, sched

        def get_model_names(self, names=None):
            return list(self._models) if names is None else ([names] if isinstance(names, str) else list(names))

        def set_model_mode(self, mode="train", names=None):
            for name in self.get_model_names(names):
                self._models[name].train(mode == "train")

        def update_lr(self, names=None):
            for name in self.get_model_names(names):
                if self._scheds[name] is not None:
                    self._scheds[name].step()

        def model_zero_grad(self, names=None):
            for name in self.get_model_names(names):
                if self._optims[name] is not None:
                    self._optims[name].zero_grad()

        def model_backward(self, loss):
            if not torch.isfinite(loss).all():
                raise FloatingPointError("Loss is infinite or NaN!")
            loss.backward()

        def model_update(self, names=None):
            for name in self.get_model_names(names):
                if self._optims[name] is not None:
                    self._optims[name].step()

        def model_backward_and_update(self, loss, names=None):
            self.model_zero_grad(names)
            self.model_backward(loss)
            self.model_update(names)

        def model_inference(self, input):
            return self.model(input)

    def compute_accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0) * 100.0 / target.size(0) for k in topk]

    def build_optimizer(model, optim_cfg):
        return NoStepSGD(model.parameters(), lr=optim_cfg.LR, momentum=optim_cfg.MOMENTUM,
                         weight_decay=optim_cfg.WEIGHT_DECAY, dampening=0.0, nesterov=False)

    def unused(*args, **kwargs):
        raise RuntimeError("not used by the reference generator")

    contents = {
        "dassl": {},
        "dassl.engine": dict(TRAINER_REGISTRY=Registry(), TrainerX=TrainerX),
        "dassl.metrics": dict(compute_accuracy=compute_accuracy),
        "dassl.utils": dict(load_pretrained_weights=unused, load_checkpoint=unused, save_checkpoint=unused),
        "dassl.optim": dict(build_optimizer=build_optimizer, build_lr_scheduler=lambda optim, cfg: NoScheduler()),
    }
    for name, attrs in contents.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        if "." in name:
            setattr(sys.modules["dassl"], name.split(".")[1], module)


# ----------------------------------------------------------------------------- patching

class _PatchedSource(importlib.machinery.SourceFileLoader):
    def __init__(self, fullname, path, subs):
        super().__init__(fullname, path)
        self.subs = subs

    def get_code(self, fullname):
        source = Path(self.path).read_text()
        for old, new, count in self.subs:
            found = source.count(old)
            if found != count:
                raise RuntimeError(f"patch for {fullname}: {old!r} found {found} times, expected {count}")
            source = source.replace(old, new)
        return compile(source, self.path, "exec")


class _PatchFinder(importlib.abc.MetaPathFinder):
    def __init__(self, patches):
        self.patches = patches

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        spec.loader = _PatchedSource(fullname, spec.origin, self.patches[fullname])
        return spec


def install_runtime_patches(official_clip, official_model, weights_path):
    """Everything here runs on a CPU, in fp32, from our random weights file."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # no GPU: .cuda() is the identity
    nn.Module.cuda = lambda self, *args, **kwargs: self
    official_clip._download = lambda url, root=None: weights_path  # every load_clip_to_cpu reads our file

    def not_torchscript(*args, **kwargs):
        raise RuntimeError("not a TorchScript archive")  # load_clip_to_cpu then falls back to torch.load

    torch.jit.load = not_torchscript
    # build_model rounds every CLIP weight to fp16 (convert_weights) before loading the state dict;
    # without it the fp32 random weights load unrounded (OpenAI's released weights are fp16 anyway).
    official_model.convert_weights = lambda model: None


# ----------------------------------------------------------------------------- inputs

def load_our_clip_module():
    spec = importlib.util.spec_from_file_location("_our_clip_model", REPO_ROOT / "clip_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clip_state_dict():
    ours = load_our_clip_module()
    return ours.random_state_dict(ours.CLIPConfig(**CLIP_CONFIG), seed=CLIP_SEED)


def state_dict_sha256(state_dict):
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def inputs():
    g = torch.Generator().manual_seed(DATA_SEED)
    size = CLIP_CONFIG["image_resolution"]
    images = torch.randn(BATCH, 3, size, size, generator=g)
    labels = torch.randint(0, len(CLASSNAMES), (BATCH,), generator=g)
    eval_images = torch.randn(N_EVAL, 3, size, size, generator=g)
    return images, labels, eval_images


def make_cfg(method, image_size=None, depth=None, max_epoch=None, **overrides):
    from yacs.config import CfgNode as CN

    recipe = RECIPES[method]
    cfg = CN()
    cfg.MODEL = CN(dict(BACKBONE=CN(dict(NAME="ViT-B/16")), INIT_WEIGHTS=""))
    size = image_size or CLIP_CONFIG["image_resolution"]
    cfg.INPUT = CN(dict(SIZE=(size, size)))
    cfg.DATASET = CN(dict(NAME=DASSL_DATASET))
    cfg.OPTIM = CN(dict(OPTIM, LR=recipe["LR"], MAX_EPOCH=max_epoch or recipe["MAX_EPOCH"]))
    node = dict(recipe["trainer"])
    for key in DEPTH_KEYS:
        if depth is not None and key in node:
            node[key] = depth
    node.update(overrides)
    cfg.TRAINER = CN(dict(NAME=OFFICIAL[method]["trainer"]))
    cfg.TRAINER[recipe["node"]] = CN(node)
    if method == "kgcoop":  # its prompt learner also reads COCOOP.PREC (to halve a dead meta-net)
        cfg.TRAINER.COCOOP = CN(dict(PREC="fp32"))
    return cfg


def build(trainer_cls, cfg, device="cpu"):
    trainer = trainer_cls.__new__(trainer_cls)  # Dassl's __init__ would build data loaders
    trainer.cfg = cfg
    trainer.dm = types.SimpleNamespace(dataset=types.SimpleNamespace(classnames=list(CLASSNAMES)))
    trainer.device = torch.device(device)
    trainer.check_cfg(cfg)
    trainer.build_model()
    return trainer


def trainable(trainer):
    return OrderedDict((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad)


class RecordingF:
    """Stands in for `torch.nn.functional` inside the trainer module: same functions, but the
    calls of the loss functions are recorded (inputs and output) so the terms can be read."""

    RECORDED = ("cross_entropy", "l1_loss", "kl_div")

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        function = getattr(torch.nn.functional, name)
        if name not in self.RECORDED:
            return function

        def recorded(*args, **kwargs):
            out = function(*args, **kwargs)
            self.calls.append((name, args, out))
            return out
        return recorded

    def outputs(self, name):
        return [out for n, _, out in self.calls if n == name]


# ----------------------------------------------------------------------------- one method

def f32(tensor):
    return tensor.detach().to(torch.float32).clone().contiguous()


def run_method(method, repo, out_path):
    spec = OFFICIAL[method]
    root = Path(repo) / spec["subdir"]
    install_dassl_stub()
    sys.meta_path.insert(0, _PatchFinder(PATCHES[method]))
    sys.path.insert(0, str(root))
    official_clip = importlib.import_module("clip.clip")
    official_model = importlib.import_module("clip.model")
    module = importlib.import_module(spec["file"][:-3].replace("/", "."))
    trainer_cls = getattr(module, spec["trainer"])

    state_dict = clip_state_dict()
    clip_sha = state_dict_sha256(state_dict)
    with tempfile.TemporaryDirectory() as tmp:
        weights_path = os.path.join(tmp, "tiny_clip.pt")
        extras = dict(input_resolution=CLIP_CONFIG["image_resolution"],
                      context_length=CLIP_CONFIG["context_length"], vocab_size=CLIP_CONFIG["vocab_size"])
        torch.save({**state_dict, **{k: torch.tensor(v) for k, v in extras.items()}}, weights_path)
        del state_dict
        install_runtime_patches(official_clip, official_model, weights_path)
        ref = reference(method, module, trainer_cls, clip_sha)
    ref["trainable_count_vit_b16"] = real_shape_count(method, trainer_cls, official_clip, load_our_clip_module())
    torch.save(ref, out_path)


def reference(method, module, trainer_cls, clip_sha):
    spec = OFFICIAL[method]
    recipe = RECIPES[method]
    images, labels, eval_images = inputs()
    torch.manual_seed(INIT_SEED)  # the official code draws its random prompt inits from the global RNG
    cfg = make_cfg(method)
    t = build(trainer_cls, cfg)
    params = trainable(t)

    ref = OrderedDict()
    ref["method"] = method
    path = f"{spec['subdir']}/{spec['file']}" if spec["subdir"] else spec["file"]
    ref["official"] = dict(repo=spec["repo"], commit=spec["commit"], file=path, trainer_class=spec["trainer"])
    ref["clip_config"] = dict(CLIP_CONFIG)
    ref["clip_seed"] = CLIP_SEED
    ref["clip_sha256"] = clip_sha  # state_dict_sha256 of random_state_dict(CLIPConfig(**clip_config), clip_seed)
    ref["torch_version"] = str(torch.__version__)
    ref["seeds"] = dict(data=DATA_SEED, official_init=INIT_SEED)
    ref["dataset"] = DATASET
    ref["dassl_dataset"] = DASSL_DATASET
    ref["classnames"] = list(CLASSNAMES)
    hparams = dict(recipe["trainer"])
    hparams.update(lr=recipe["LR"], max_epoch=recipe["MAX_EPOCH"], recipe_batch_size=recipe["batch_size"],
                   optimizer="sgd", momentum=OPTIM["MOMENTUM"], weight_decay=OPTIM["WEIGHT_DECAY"],
                   warmup_epoch=OPTIM["WARMUP_EPOCH"], warmup_cons_lr=OPTIM["WARMUP_CONS_LR"],
                   lr_scheduler=OPTIM["LR_SCHEDULER"])
    hparams["loss_weights"] = dict(ce=1.0)
    if method == "kgcoop":
        hparams["loss_weights"]["kg"] = float(cfg.TRAINER.COOP.W)
    if method == "promptsrc":
        hparams["loss_weights"].update(text_l1=float(cfg.TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT),
                                       image_l1=float(cfg.TRAINER.PROMPTSRC.IMAGE_LOSS_WEIGHT), kl=1.0)
    if any(k in recipe["trainer"] for k in DEPTH_KEYS):
        hparams["recipe_prompt_depth"] = 9
    ref["hparams"] = hparams
    ref["images"], ref["labels"], ref["eval_images"] = images, labels, eval_images
    ref["init"] = OrderedDict((n, f32(p)) for n, p in params.items())
    ref["trainable_count"] = sum(p.numel() for p in params.values())

    # Eval logits with the initial weights, as Dassl's test() does.
    t.set_model_mode("eval")
    with torch.no_grad():
        ref["eval_logits"] = f32(t.model_inference(eval_images))

    # One official training step (its optimiser step is a no-op here, so grads are those of the loss).
    t.set_model_mode("train")
    recorder, outputs = RecordingF(), []
    module.F = recorder
    hook = t.model.register_forward_hook(lambda mod, args, out: outputs.append(out))
    t.batch_idx, t.num_batches = 0, 2  # a mid-epoch step: no lr update, no GPA bookkeeping
    summary = t.forward_backward({"img": images.clone(), "label": labels.clone()})
    hook.remove()
    module.F = torch.nn.functional
    out = outputs[0]
    ce = recorder.outputs("cross_entropy")
    assert len(ce) == 1, ce
    losses = OrderedDict(total=float(summary["loss"]), ce=ce[0].item())
    logits = [args[0] for name, args, _ in recorder.calls if name == "cross_entropy"][0]
    if method == "kgcoop":
        logits_out, score = out
        assert logits_out is logits
        losses["kg"] = score.item()
        ref["text_features_clip"] = f32(t.model.prompt_learner.text_features)
    if method == "promptsrc":
        l1 = recorder.outputs("l1_loss")
        kl_sum = recorder.outputs("kl_div")
        assert len(l1) == 2 and len(kl_sum) == 1
        _, text_features, fixed, zs_image, image_features, zs_logits, logits_out = out
        assert logits_out is logits
        losses["text_l1"] = l1[0].item()
        losses["image_l1"] = l1[1].item()
        losses["kl"] = (kl_sum[0] * (1 * 1) / logits.numel()).item()
        ref["fixed_embeddings_mean"] = f32(t.model.prompt_learner.fixed_embeddings)
        ref["fixed_embeddings"] = f32(fixed)
        ref["zs_image_features"] = f32(zs_image)
        ref["zs_logits"] = f32(zs_logits)
        ref["text_features"] = f32(text_features)
        ref["image_features"] = f32(image_features)
    ref["logits"] = f32(logits)
    ref["losses"] = dict(losses)
    ref["grads"] = OrderedDict((n, f32(p.grad)) for n, p in params.items())
    if method == "promptsrc":
        ref["gpa"] = gpa_reference(trainer_cls, ref["init"], images, labels)
    return ref


def gpa_reference(trainer_cls, init, images, labels):
    gpa = OrderedDict()
    for mu, sigma, epochs in ((15, 1, 20), (6, 10, 20)):
        t = build(trainer_cls, make_cfg("promptsrc", GPA_MEAN=mu, GPA_STD=sigma, max_epoch=epochs))
        gpa[f"weights_mu{mu}_sigma{sigma}_epochs{epochs}"] = torch.as_tensor(t.gauss, dtype=torch.float64)
        del t
    # Three fake epochs: after epoch k the trainable tensors are init + step * k * S; the official
    # end-of-epoch code (one batch per epoch) accumulates and finally loads the Gaussian average.
    sim = GPA_SIM
    t = build(trainer_cls, make_cfg("promptsrc", GPA_MEAN=sim["mu"], GPA_STD=sim["sigma"], max_epoch=sim["epochs"]))
    params = trainable(t)
    states = []
    for k in range(1, sim["epochs"] + 1):
        state = OrderedDict()
        with torch.no_grad():
            for name, p in params.items():
                sign = 1.0 - 2.0 * (torch.arange(p.numel()) % 2).to(p.dtype)
                p.copy_(init[name] + sim["step"] * k * sign.reshape(p.shape))
                state[name] = f32(p)
        states.append(state)
        t.batch_idx, t.num_batches = 0, 1
        t.forward_backward({"img": images.clone(), "label": labels.clone()})
    gpa["sim"] = dict(mu=sim["mu"], sigma=sim["sigma"], epochs=sim["epochs"], step=sim["step"],
                      perturbation="after epoch k (1-based): init + step * k * S, S = +1, -1, +1, ... over "
                                   "each tensor's elements in row-major order",
                      weights=torch.as_tensor(t.gauss, dtype=torch.float64), states=states,
                      result=OrderedDict((n, f32(p)) for n, p in trainable(t).items()))
    return gpa


def real_shape_count(method, trainer_cls, official_clip, ours):
    """Trainable count of the official build_model at real ViT-B/16 shapes and the recipe's prompt
    depth (9), built on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        state_dict = ours.CLIP(ours.CONFIGS["ViT-B/16"]).state_dict()
    state_dict.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                      vocab_size=torch.tensor(49408))
    official_clip._download = lambda url, root=None: "<meta>"
    real_load = torch.load
    torch.load = lambda path, *a, **k: dict(state_dict) if path == "<meta>" else real_load(path, *a, **k)
    try:
        with torch.device("meta"):
            t = build(trainer_cls, make_cfg(method, image_size=224, depth=9), device="meta")
        return sum(p.numel() for p in trainable(t).values())
    finally:
        torch.load = real_load


# ----------------------------------------------------------------------------- driver

def check_snapshot(method, repo):
    root = Path(repo) / OFFICIAL[method]["subdir"]
    for rel, expected in SNAPSHOT_SHA256[method].items():
        path = root / rel
        if not path.is_file():
            sys.exit(f"{method}: {path} not found (is {repo} a checkout of {OFFICIAL[method]['repo']}?)")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            sys.exit(f"{method}: {path} differs from {OFFICIAL[method]['repo']}@{OFFICIAL[method]['commit'][:7]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for arg, repo in (("coop", "KaiyangZhou/CoOp"), ("kgcoop", "htyao89/KgCoOp"),
                      ("maple", "muzairkhattak/multimodal-prompt-learning"), ("promptsrc", "muzairkhattak/PromptSRC")):
        parser.add_argument(f"--{arg}", help=f"checkout of {repo}")
    parser.add_argument("--out", default=str(HERE), help="folder for <method>.pt (default: this folder)")
    parser.add_argument("--methods", default=",".join(OFFICIAL), help="comma-separated subset")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "REPO", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, repo, out = args.worker
        return run_method(method, repo, out)

    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        repo = getattr(args, OFFICIAL[method]["arg"])
        if not repo:
            parser.error(f"{method} needs --{OFFICIAL[method]['arg']}")
        check_snapshot(method, repo)
    os.makedirs(args.out, exist_ok=True)
    for method in methods:
        repo = getattr(args, OFFICIAL[method]["arg"])
        out = os.path.join(args.out, f"{method}.pt")
        start = time.time()
        proc = subprocess.run([sys.executable, __file__, "--worker", method, os.path.abspath(repo), out],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            sys.exit(f"{method}: the official code failed (output above)")
        size = os.path.getsize(out)
        print(f"{method:10s} {time.time() - start:6.1f} s  {size / 1e6:6.2f} MB  {out}")


if __name__ == "__main__":
    main()
