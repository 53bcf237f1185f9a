"""Evaluate a CoOp + TextRefiner or PromptKD + TextRefiner checkpoint, zero-shot CLIP, or
summarise finished runs. The checkpoint says its --method; a PromptKD student is evaluated with
the teacher file it was distilled from (by SHA-256; --teacher to point at it elsewhere,
--allow-other-teacher to use another).

A checkpoint written by train.py on the new classes of the same dataset (base2new):
    python eval.py --checkpoint output/base2new/dtd/seed1/base/best.pt --subsample new \
        --output-dir output/base2new/dtd/seed1/new
On another dataset (cross-dataset / domain generalisation; all its classes):
    python eval.py --checkpoint output/xd/imagenet/seed1/last.pt --dataset imagenet_a --root /data \
        --output-dir output/xd/imagenet_a/seed1
Sharded over GPUs (every image counted once):
    torchrun --standalone --nproc_per_node=4 eval.py --checkpoint ... --dataset imagenet --root /data
A run of the authors' released code (its Dassl output folder, holding prompt_learner/ and Memory/;
model-best.pth.tar by default, model.pth.tar-N with --epoch N):
    python eval.py --checkpoint their_output/base2new/train_base/dtd/.../seed1 --dataset dtd --root /data \
        --subsample new
A run folder of the authors' PromptKD + TextRefiner code (VLPromptLearner/ and Memory/):
    python eval.py --checkpoint their_output/... --dataset dtd --root /data --teacher /teachers \
        --subsample new
Zero-shot CLIP with CoOp's hand-crafted prompt:
    python eval.py --zeroshot --dataset dtd --root /data --subsample new
Tables over seeds and datasets (base/new/HM next to the published averages):
    python eval.py --report output/base2new
    python eval.py --report output/xd
    python eval.py --report output/promptkd/base2new
Inference throughput on random ViT-B/16 weights (no data needed):
    python eval.py --benchmark --num-classes 1000

--dataset, --root, --clip, --shots, --seed and --precision default to the checkpoint's own run
(--precision: on CUDA; the CPU computes in fp32); --subsample defaults to the checkpoint's when
the dataset is the same, else to all classes.
results.json holds accuracy, macro_f1, per_class_accuracy (a list aligned with classnames),
classnames, num_images, num_classes, split and the arguments as resolved. An existing results.json
of another dataset, subsample, split or checkpoint in --output-dir is never replaced.
"""
import argparse
import json
import math
import os
import pickle
import sys
import types

import numpy as np
import torch

import clip_model
import data
import train
from clip_model import read_dassl_file
from data import DataError, MissingData, UserError
from textrefiner import ZeroShotCLIP

# The 11 base-to-new datasets in the paper's table order, with the paper's names.
PAPER_DATASETS = {"imagenet": "ImageNet", "caltech101": "Caltech101", "oxford_pets": "OxfordPets",
                  "stanford_cars": "StanfordCars", "oxford_flowers": "Flowers102", "food101": "Food101",
                  "fgvc_aircraft": "FGVCAircraft", "sun397": "SUN397", "dtd": "DTD",
                  "eurosat": "EuroSAT", "ucf101": "UCF101"}
# Cross-dataset / domain-generalisation table order: source, ImageNet variants, the other 10.
XD_ORDER = ["imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"] + \
    [d for d in PAPER_DATASETS if d != "imagenet"]
METHOD_NAMES = {"coop": "CoOp + TextRefiner", "promptkd": "PromptKD + TextRefiner"}
# Published 11-dataset base2new averages (base, new, HM), ViT-B/16, 3 seeds, per method's table.
PUBLISHED_AVERAGES = {
    "coop": {"CoOp": (82.69, 63.22, 71.66), "CoOp+TextRefiner": (79.74, 74.32, 76.94)},
    "promptkd": {"PromptKD+TextRefiner": (85.22, 79.64, 82.33), "PromptKD": (86.96, 80.73, 83.73)},
}
PUBLISHED_NOTES = {
    "coop": "Published 11-dataset averages (ViT-B/16, 16 shots, seeds 1-3):",
    "promptkd": "Published 11-dataset averages (ViT-B/16 student, seeds 1-3; PromptKD+TextRefiner: the TextRefiner "
                "paper, 16 unlabelled shots; PromptKD and the PK columns: PromptKD's README, the full unlabelled "
                "train set):",
}
# Published per-dataset numbers shown beside ours, per method. PromptKD's README
# (promptkd_released.md E3): base, new, HM.
PUBLISHED_PER_DATASET = {"promptkd": {
    "imagenet": (80.83, 74.66, 77.62), "caltech101": (98.91, 96.65, 97.77), "oxford_pets": (96.30, 98.01, 97.15),
    "stanford_cars": (82.80, 83.37, 83.13), "oxford_flowers": (99.42, 82.62, 90.24),
    "food101": (92.43, 93.68, 93.05), "fgvc_aircraft": (49.12, 41.81, 45.17), "sun397": (83.69, 81.54, 82.60),
    "dtd": (85.84, 71.37, 77.94), "eurosat": (97.54, 82.08, 89.14), "ucf101": (89.71, 82.27, 86.10)}}
# Its transductive cross-dataset accuracy per target (ImageNet-xd teacher).
PUBLISHED_XD = {"promptkd": {
    "caltech101": 93.61, "oxford_pets": 91.59, "stanford_cars": 73.93, "oxford_flowers": 75.33, "food101": 88.84,
    "fgvc_aircraft": 26.24, "sun397": 68.57, "dtd": 55.08, "eurosat": 63.74, "ucf101": 76.39}}
# The released code's feature alignment, mid_image_trans.conv1 = Sequential(Conv2d(D, D, 1),
# BatchNorm2d(D), ReLU, Conv2d(D, D, 1)) run on (N, D, 1, 1), -> our FeatureAlign names. On 1x1
# inputs BatchNorm2d normalises over the same N rows as BatchNorm1d and has the same keys.
AUTHORS_ALIGN = {"0.weight": "fc1.weight", "0.bias": "fc1.bias", "1.weight": "bn.weight",
                 "1.bias": "bn.bias", "1.running_mean": "bn.running_mean",
                 "1.running_var": "bn.running_var", "1.num_batches_tracked": "bn.num_batches_tracked",
                 "3.weight": "fc2.weight", "3.bias": "fc2.bias"}
AUTHORS_CONV_WEIGHTS = ("0.weight", "3.weight")


def get_parser():
    p = argparse.ArgumentParser(description="Evaluate a checkpoint, zero-shot CLIP, or report results.")
    p.add_argument("--checkpoint", help="train.py's best.pt/last.pt, or an authors' run folder")
    p.add_argument("--epoch", type=int, help="authors' folder: load model.pth.tar-EPOCH (default: model-best)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="authors' files: unpickle every object they hold, not only tensors "
                        "(runs code from the file; trusted files only; not needed for the released format)")
    p.add_argument("--zeroshot", action="store_true", help="zero-shot CLIP instead of a checkpoint")
    p.add_argument("--method", choices=tuple(train.METHODS),
                   help="refuse a checkpoint of another method (default: whatever the checkpoint is)")
    p.add_argument("--teacher", help="PromptKD students: the teacher file (or the folder of the released teachers); "
                                     "default: the run's own")
    p.add_argument("--teacher-clip", help="PromptKD students: the teacher's base CLIP (default: the run's, ViT-L/14)")
    p.add_argument("--allow-other-teacher", action="store_true",
                   help="PromptKD students: evaluate with another teacher file than the one the run recorded")
    p.add_argument("--dataset", help=f"one of {', '.join(data.DATASETS)}")
    p.add_argument("--root", help="data root")
    p.add_argument("--subsample", choices=data.SUBSAMPLES)
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--clip", help="CLIP name or weights file (default: the checkpoint's, else ViT-B/16)")
    p.add_argument("--shots", type=int, help="few-shot split that defines base/new (default: checkpoint's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, help="per rank (default 100; --benchmark: 32)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device")
    p.add_argument("--dist-timeout", **train.DIST_TIMEOUT_FLAG)
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"),
                   help="default on CUDA: the checkpoint's (authors': fp16 or fp32 as stored); fp32 on CPU")
    p.add_argument("--output-dir", help="write results.json here")
    p.add_argument("--report", metavar="DIR", help="summarise output/base2new or output/xd and exit")
    p.add_argument("--benchmark", action="store_true", help="time synthetic inference and exit")
    p.add_argument("--benchmark-clip", default="ViT-B/16", choices=tuple(clip_model.CONFIGS))
    p.add_argument("--benchmark-steps", type=int, default=20)
    p.add_argument("--benchmark-warmup", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=100)
    return p


# ----------------------------------------------------------------------------- checkpoints

def authors_clip_name(learner):
    """Backbone of the run from the frozen image tower the released code also saves
    (image_encoder.*): the official name with that width, patch and resolution, else None."""
    conv, pos = learner.get("image_encoder.conv1.weight"), learner.get("image_encoder.positional_embedding")
    if conv is None or pos is None:
        return None
    width, patch, grid = conv.shape[0], conv.shape[-1], round((pos.shape[0] - 1) ** 0.5)
    for name, config in clip_model.CONFIGS.items():
        if name != "tiny" and (config.vision_width, config.vision_patch_size, config.image_resolution) == \
                (width, patch, patch * grid):
            return name
    return None


# The released runs' output folders: Dassl registers two models, the prompt learner and Memory.
# CoOp + TextRefiner calls the first prompt_learner/, PromptKD + TextRefiner VLPromptLearner/.
AUTHORS_LEARNER = {"coop": "prompt_learner", "promptkd": "VLPromptLearner"}


def authors_method(folder):
    """Which released trainer wrote the run folder, from its sub-folders; None if neither."""
    found = [m for m, part in AUTHORS_LEARNER.items() if os.path.isdir(os.path.join(folder, part))]
    return found[0] if len(found) == 1 else None


def authors_projector(learner, theirs, ours, path):
    """{ours.fc1/bn/fc2...: tensor} from the released two-layer projector theirs.conv1.{0,1,3}
    (1x1 Conv2d, BatchNorm2d, ReLU, 1x1 Conv2d on (N, C, 1, 1)): the same function as Linear ->
    BatchNorm1d -> ReLU -> Linear over the N rows."""
    out = {}
    for their_key, our_key in AUTHORS_ALIGN.items():
        tensor = learner[f"{theirs}.conv1.{their_key}"]
        if their_key in AUTHORS_CONV_WEIGHTS:
            if tensor.dim() != 4 or tuple(tensor.shape[2:]) != (1, 1):
                raise DataError(f"{path}: {theirs}.conv1.{their_key} should be a 1x1 convolution weight "
                                f"(out, in, 1, 1), found {tuple(tensor.shape)}")
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # Conv2d 1x1 -> Linear
        out[f"{ours}.{our_key}"] = tensor
    return out


def projector_keys(theirs):
    return [f"{theirs}.conv1.{k}" for k in AUTHORS_ALIGN]


def coop_learner_state(learner, path):
    """CoOp + TextRefiner's prompt_learner/ state dict: prompt_learner.ctx (n_ctx, W), the fixed
    prompt buffers of the training classes (ignored: prompts are rebuilt for the classes
    evaluated), the frozen CLIP as image_encoder.* / text_encoder.* / logit_scale (checked
    against --clip), the alignment mid_image_trans.conv1.{0,1,3}. -> (state, hyper-parameters)."""
    check_keys(learner, ["prompt_learner.ctx"] + projector_keys("mid_image_trans"), path,
               "a CoOp + TextRefiner run")
    ctx = learner["prompt_learner.ctx"]
    if ctx.dim() != 2:
        raise DataError(f"{path}: class-specific contexts (CSC) are not supported")
    n_ctx = ctx.shape[0]
    # The released scripts initialise 4 context vectors from "a photo of a"; the phrase only
    # fixes the prompt's token positions, whose embeddings the loaded ctx replaces.
    hp = dict(n_ctx=n_ctx, ctx_init="a photo of a" if n_ctx == 4 else "")
    return dict({"prompt_learner.ctx": ctx}, **authors_projector(learner, "mid_image_trans", "refiner.align", path)), hp


def promptkd_learner_state(learner, path):
    """PromptKD + TextRefiner's VLPromptLearner/ state dict (promptkd_released.md G2): the student's
    image tower as image_encoder.* with its deep visual prompts image_encoder.VPT (n_ctx, W) and
    image_encoder.transformer.resblocks.{1..depth-1}.VPT_shallow, the global projector
    VPT_image_trans.conv1.{0,1,3} and the alignment mid_image_trans.conv1.{0,1,3} (SPEC 11.5).
    -> (state, hyper-parameters)."""
    check_keys(learner, ["image_encoder.VPT"] + projector_keys("VPT_image_trans") + projector_keys("mid_image_trans"),
               path, "a PromptKD + TextRefiner run")
    shallow = sorted(int(k.split(".")[3]) for k in learner
                     if k.startswith("image_encoder.transformer.resblocks.") and k.endswith(".VPT_shallow"))
    depth = len(shallow) + 1
    if shallow != list(range(1, depth)):
        raise DataError(f"{path}: deep visual prompts in blocks {shallow}; expected blocks 1..{depth - 1}")
    prompts = [learner["image_encoder.VPT"]] + [
        learner[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] for i in shallow]
    if len({tuple(p.shape) for p in prompts}) != 1 or prompts[0].dim() != 2:
        raise DataError(f"{path}: the visual prompts differ in shape ({[tuple(p.shape) for p in prompts]})")
    state = {"visual_prompts": torch.stack(prompts)}  # (depth, n_ctx, W)
    state.update(authors_projector(learner, "VPT_image_trans", "image_proj", path))
    state.update(authors_projector(learner, "mid_image_trans", "refiner.align", path))
    return state, dict(depth=depth, n_ctx=prompts[0].shape[0])


AUTHORS_LEARNER_STATE = {"coop": coop_learner_state, "promptkd": promptkd_learner_state}


def check_keys(state, needed, path, what):
    absent = [k for k in needed if k not in state]
    if absent:
        raise DataError(f"{path}: missing {absent}; is this {what}?")
    for k in needed:
        if not isinstance(state[k], torch.Tensor):
            raise DataError(f"{path}: {k} is a {type(state[k]).__name__}, expected a tensor")


def load_authors_checkpoint(folder, epoch=None, allow_pickle=False):
    """(state dict with our names, run info) from an output folder of the released code.

    CoOp + TextRefiner folders hold prompt_learner/ and Memory/, PromptKD + TextRefiner ones
    VLPromptLearner/ and Memory/; each part has model.pth.tar-<epoch> (epoch counted from 1; the
    last one for --epoch 10) and, with best_val model selection, model-best.pth.tar. Each file
    is Dassl's {'state_dict', 'epoch', 'optimizer', 'scheduler', 'val_result'}; the prompt
    learner's state dict is mapped by coop_learner_state / promptkd_learner_state; Memory's
    'state_dict' is {'extractor.weight': (D, 2D)}, and the cache is not a buffer but the file's
    own top-level entry 'memory_item' (M, D). With the released default precision (fp16) the
    convolutions, extractor and cache (and CoOp's ctx) are fp16, BatchNorm and PromptKD's visual
    prompts fp32; everything is returned in fp32 (num_batches_tracked as is).
    info: method, epoch, val_result, precision, clip (the official name of the stored image
    tower, or None), clip_weights (the stored CLIP, OpenAI names), hp (the run's shape flags)."""
    method = authors_method(folder)
    if method is None:
        raise MissingData(f"authors' checkpoint folder {folder!r}: expected prompt_learner/ and Memory/ "
                          f"(CoOp + TextRefiner) or VLPromptLearner/ and Memory/ (PromptKD + TextRefiner)")
    name = f"model.pth.tar-{epoch}" if epoch is not None else "model-best.pth.tar"
    paths = {part: os.path.join(folder, part, name) for part in (AUTHORS_LEARNER[method], "Memory")}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise MissingData(f"authors' checkpoint folder {folder!r}: expected {missing} "
                          f"(choose the file with --epoch N for model.pth.tar-N)")
    files = {}
    for part, path in paths.items():
        try:
            files[part] = read_dassl_file(path, allow_pickle)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
            raise DataError(f"{path}: unreadable ({str(e).splitlines()[0][:200]}); a file cut short?") from None
        if not isinstance(files[part], dict) or not isinstance(files[part].get("state_dict"), dict):
            raise DataError(f"{path}: not a Dassl checkpoint (no 'state_dict' entry)")
    learner_path, learner = paths[AUTHORS_LEARNER[method]], files[AUTHORS_LEARNER[method]]["state_dict"]
    memory = files["Memory"]
    if "extractor.weight" not in memory["state_dict"]:
        raise DataError(f"{paths['Memory']}: no 'extractor.weight' in its state_dict")
    if "memory_item" not in memory:
        raise DataError(f"{paths['Memory']}: no 'memory_item' (the cache) in the file")
    for key, value in (("state_dict.extractor.weight", memory["state_dict"]["extractor.weight"]),
                       ("memory_item", memory["memory_item"])):
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{paths['Memory']}: {key} is a {type(value).__name__}, expected a tensor")
    if memory["memory_item"].dim() != 2:
        raise DataError(f"{paths['Memory']}: memory_item has shape {tuple(memory['memory_item'].shape)}, "
                        f"expected (cache size, D)")
    state, hp = AUTHORS_LEARNER_STATE[method](learner, learner_path)
    state.update({"refiner.extractor.weight": memory["state_dict"]["extractor.weight"],
                  "refiner.cache": memory["memory_item"]})
    conv = learner["mid_image_trans.conv1.0.weight"]
    state = {k: v.detach() if k.endswith("num_batches_tracked") else v.detach().float()
             for k, v in state.items()}
    hp["cache_size"] = state["refiner.cache"].shape[0]
    info = dict(method=method, epoch=files[AUTHORS_LEARNER[method]].get("epoch"),
                val_result=files[AUTHORS_LEARNER[method]].get("val_result"),
                precision="fp16" if conv.dtype == torch.float16 else "fp32", clip=authors_clip_name(learner),
                clip_weights=authors_clip_weights(learner), hp=hp)
    return state, info


def authors_clip_weights(learner):
    """{OpenAI name: tensor} of the frozen CLIP an authors' run stored in its prompt learner's
    state dict (image_encoder.* = visual.*, text_encoder.* = the text tower's names; PromptKD's
    visual prompts, image_encoder.VPT and ...VPT_shallow, are not CLIP's): the weights it was
    trained with, to check --clip against."""
    renames = (("image_encoder.", "visual."), ("text_encoder.", ""))
    return {ours + k[len(theirs):]: v for k, v in learner.items() for theirs, ours in renames
            if k.startswith(theirs) and isinstance(v, torch.Tensor) and "VPT" not in k}


def check_authors_clip(clip, weights, clip_name, folder):
    """Refuse a --clip whose weights are not the ones the authors' run stored (compared in the
    stored dtype: their fp16 copy of OpenAI's fp16 weights equals ours cast back)."""
    ours = clip.state_dict()
    for key, theirs in weights.items():
        if key not in ours or ours[key].shape != theirs.shape or not torch.equal(ours[key].to(theirs.dtype), theirs):
            raise UserError(f"--clip {clip_name}: its weights differ from the CLIP stored in {folder} "
                            f"(first: {key}); pass the CLIP that run was trained with as --clip")


def train_defaults(method="coop", dataset=None):
    """train.py's flag defaults as a dict, the recipe flags filled from the method's row."""
    p = train.get_parser()
    args = p.parse_args(["--method", method] + (["--dataset", dataset] if dataset else []))
    train.apply_recipe(p, args)
    return vars(args)


def read_checkpoint(args):
    """-> (trainable state dict, hyper-parameters of the run that wrote it, the CLIP weights an
    authors' folder stores (None for train.py's checkpoints, which hold no CLIP))."""
    if os.path.isdir(args.checkpoint):
        ours = [n for n in ("best.pt", "last.pt") if os.path.isfile(os.path.join(args.checkpoint, n))]
        if ours and authors_method(args.checkpoint) is None:
            raise UserError(f"--checkpoint {args.checkpoint} is a train.py output folder: pass the file, "
                            f"{os.path.join(args.checkpoint, ours[0])}")
        state, info = load_authors_checkpoint(args.checkpoint, args.epoch, args.allow_pickle)
        defaults = train_defaults(info["method"])
        hp = dict(defaults, **info["hp"], method=info["method"], dataset=None, precision=info["precision"],
                  clip=info["clip"] or defaults["clip"], teacher=None, teacher_sha256=None)
        return state, hp, info["clip_weights"]
    ckpt = train.load_checkpoint(args.checkpoint)
    method = train.recorded(ckpt["args"], "method")
    hp = dict(train_defaults(method, ckpt["args"].get("dataset")), **ckpt["args"])
    # the selection the run made (results.json's), e.g. "best-test"; older checkpoints: the flag
    hp.update(method=method, selection=ckpt.get("selection", train.recorded(ckpt["args"], "selection")))
    return ckpt["model"], hp, None


def check_method(args, hp):
    """The flags of the checkpoint's method only: a CoOp checkpoint on the PromptKD path (--method
    promptkd, --teacher) and the reverse are refused, naming what the checkpoint is."""
    method = train.METHODS[hp["method"]]
    if args.method and args.method != hp["method"]:
        raise UserError(f"--method {args.method}: {args.checkpoint} is a --method {hp['method']} checkpoint")
    if not method.teacher and (args.teacher or args.teacher_clip or args.allow_other_teacher):
        flag = "--teacher" if args.teacher else "--teacher-clip" if args.teacher_clip else "--allow-other-teacher"
        raise UserError(f"{flag}: {args.checkpoint} is a --method {hp['method']} checkpoint, which has no teacher "
                        f"(a PromptKD student's checkpoint takes {flag})")


def resolve_eval_teacher(args, hp, dataset, subsample):
    """The teacher file a PromptKD student is evaluated with: --teacher (a file, or the folder of
    the released teachers), else the run's own. Another file than the run's (by SHA-256) is
    refused unless --allow-other-teacher: the student was distilled from that one teacher."""
    path = args.teacher or hp["teacher"]
    if path is None:
        raise UserError(f"--teacher is required: {args.checkpoint} names no teacher file (an authors' run folder "
                        f"does not record it; pass the PromptKD teacher it was distilled from)")
    if not os.path.exists(path):
        raise UserError(f"--teacher {path!r}: no such file or folder"
                        + ("" if args.teacher else f" (the teacher {args.checkpoint} was trained with; pass --teacher)"))
    path = train.teacher_file(path, dataset, subsample)
    sha = clip_model._sha256(path)
    if hp["teacher_sha256"] not in (None, sha) and not args.allow_other_teacher:
        raise UserError(f"--teacher {path}: not the teacher {args.checkpoint} was distilled from ({hp['teacher']}, "
                        f"SHA-256 {hp['teacher_sha256'][:16]}..., this file {sha[:16]}...); pass that file, or "
                        f"--allow-other-teacher to evaluate the student with this one anyway")
    return path, sha


# ----------------------------------------------------------------------------- evaluation

def eval_precision(args, hp, device):
    """--precision, else on CUDA the precision the checkpoint was trained in (a model trained
    in fp32 is tested in fp32, not in the bf16 default); the CPU computes in fp32 (SPEC 8)."""
    if args.precision is None and device.type == "cuda" and hp["precision"]:
        return hp["precision"]
    return train.default_precision(args, device)


def check_results_target(path, expected):
    """Refuse to replace a results.json of another evaluation (dataset, subsample, split or
    checkpoint): e.g. --output-dir pointed at the training folder with --subsample new."""
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
        found = {k: old.get(k) for k in expected}
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{path} exists and is not a readable results.json; move it away or choose another "
                        f"--output-dir") from None
    found["checkpoint"] = os.path.realpath(found["checkpoint"]) if isinstance(found["checkpoint"], str) else None
    differ = {k: f"{found[k]} here, {v} now" for k, v in expected.items() if found[k] != v}
    if differ:
        raise UserError(f"{path} holds the results of another evaluation ({differ}); choose another "
                        f"--output-dir, or delete it")


def run(args):
    rank, world_size, device, _ = train.setup_runtime(args)
    state, hp, stored_clip = (None, train_defaults(), None) if args.zeroshot else read_checkpoint(args)
    if not args.zeroshot:
        check_method(args, hp)
    method = train.METHODS[hp["method"]]
    precision = eval_precision(args, hp, device)
    dataset = args.dataset or hp["dataset"]
    root = args.root or hp["root"]
    source = "zero-shot CLIP has no run to take it from" if args.zeroshot else f"{args.checkpoint} does not name one"
    if dataset is None:
        raise SystemExit(f"--dataset is required: {source}")
    if dataset not in data.DATASETS:
        raise SystemExit(f"--dataset {dataset!r}: expected one of {', '.join(data.DATASETS)}")
    if root is None:
        raise SystemExit(f"--root is required: {source}")
    if not os.path.isdir(root):
        raise SystemExit(f"--root {root!r} is not a directory")
    subsample = args.subsample or (hp["subsample"] if dataset == hp["dataset"] else "all")
    if not args.zeroshot and method.labelled and dataset == hp["dataset"] and hp["subsample"] == "all" \
            and subsample == "new":
        raise UserError(f"--subsample new: {args.checkpoint} was trained on all classes of {dataset} "
                        f"(subsample: all), so its 'new' classes are training classes; use --subsample all")
    checkpoint = "zero-shot CLIP" if args.zeroshot else args.checkpoint
    if args.output_dir:
        check_results_target(os.path.join(args.output_dir, "results.json"), dict(
            dataset=dataset, subsample=subsample, split=args.split, checkpoint=os.path.realpath(checkpoint)))
    shots = hp["shots"] if args.shots is None else args.shots
    seed = hp["seed"] if args.seed is None else args.seed
    # The run's own classes (its teacher, for PromptKD): its subsample on its dataset; an
    # authors' folder or another dataset: the classes evaluated.
    run_subsample = hp["subsample"] if dataset == hp["dataset"] else subsample
    teacher = dict(teacher=None, teacher_sha256=None)
    if method.teacher and not args.zeroshot:
        path, sha = resolve_eval_teacher(args, hp, dataset, run_subsample)
        teacher = dict(teacher=path, teacher_sha256=sha, teacher_clip=args.teacher_clip or hp["teacher_clip"])
    hp = dict(hp, dataset=dataset, root=root, shots=shots, seed=seed, subsample=run_subsample, **teacher)
    run_data = method.data(types.SimpleNamespace(**dict(hp, subsample=subsample)))
    classnames, items = run_data.eval_classnames, getattr(run_data, args.split)
    if not items:
        raise SystemExit(f"{dataset}: the {args.split} split is empty")

    clip_name = args.clip or hp["clip"]
    clip = train.load_clip(clip_name)
    if stored_clip:
        check_authors_clip(clip, stored_clip, clip_name, args.checkpoint)
    if args.zeroshot:
        model = ZeroShotCLIP(clip, classnames, dataset)
    else:
        model = train.build_model(types.SimpleNamespace(**hp), run_data.classnames, clip)
        try:
            model.load_trainable_state_dict(state)
        except ValueError as e:
            raise UserError(f"{args.checkpoint}: its tensors do not fit a --method {hp['method']} model with "
                            f"its recorded flags ({e})") from None
    model.to(device)
    loader = data.build_eval_loader(items, args.batch_size or 100, clip.config.image_resolution,
                                    rank=rank, world_size=world_size, workers=args.workers,
                                    pin_memory=device.type == "cuda")
    columns = None if args.zeroshot else run_data.columns
    results = train.evaluate(model, loader, classnames, device, precision, columns=columns)
    # The values actually used, not the flags as typed (None = "the checkpoint's").
    resolved = dict(dataset=dataset, root=root, subsample=subsample, shots=shots, seed=seed,
                    clip=clip_name, precision=precision, method=hp["method"], **teacher)
    results.update(split=args.split, dataset=dataset, subsample=subsample, checkpoint=checkpoint,
                   method=None if args.zeroshot else hp["method"],
                   selection=None if args.zeroshot else hp["selection"],
                   teacher=teacher["teacher"], teacher_sha256=teacher["teacher_sha256"],
                   args=dict(vars(args), **resolved))
    if rank == 0:
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            train.remove_leftover_tmp(args.output_dir, ["results.json"])
            train.write_json(results, os.path.join(args.output_dir, "results.json"))
        print(f"{dataset} {subsample} {args.split}: accuracy {results['accuracy']:.2f} "
              f"macro-F1 {results['macro_f1']:.2f} on {results['num_images']} images, "
              f"{len(classnames)} classes")
    return results


# ----------------------------------------------------------------------------- reports

def harmonic_mean(base, new):
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def dataset_dirs(root):
    """The <root>/<dataset> folders (files such as report.json are not runs)."""
    return [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]


def seed_dirs(folder, problems):
    """[(S, <folder>/seed<S>)] in order of S; any other entry is added to problems."""
    found = []
    for name in sorted(os.listdir(folder)):
        digits = name[len("seed"):]
        if name.startswith("seed") and digits.isdigit() and os.path.isdir(os.path.join(folder, name)):
            found.append((int(digits), os.path.join(folder, name)))
        else:
            problems.append(f"{os.path.join(folder, name)}: unexpected (runs are folders seed<N>); move it out")
    return sorted(found)


def read_accuracy(path, dataset, subsample, problems, seen):
    """The accuracy in a results.json, once the file is checked to be the test of `dataset` on
    `subsample` classes, as its folder says; None (and a line in problems) otherwise. seen:
    {(method, model selection): first path} of the files read (files written before --method
    existed are CoOp's)."""
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        problems.append(f"{path}: unreadable ({e}); re-run that step or move its folder out")
        return None
    if not isinstance(result, dict):
        problems.append(f"{path}: not a results.json (a JSON object); re-run that step or move its folder out")
        return None
    accuracy = result.get("accuracy")
    expected = dict(dataset=dataset, subsample=subsample, split="test")
    wrong = {k: result.get(k) for k, v in expected.items() if result.get(k) != v}
    if wrong:
        problems.append(f"{path}: holds {wrong}, but its folder is for {expected}; move the file to its "
                        f"place or re-run that step")
    elif type(accuracy) not in (int, float) or not math.isfinite(accuracy):
        problems.append(f"{path}: accuracy is {accuracy!r}, expected a number; re-run that step")
    else:
        seen.setdefault((result.get("method") or "coop", result.get("selection")), path)
        return accuracy
    return None


def collect_base2new(root, problems, seen):
    """{dataset: {seed: (base acc, new acc)}} from <root>/<dataset>/seed<S>/{base,new}/results.json."""
    runs = {}
    for dataset in dataset_dirs(root):
        for seed, d in seed_dirs(os.path.join(root, dataset), problems):
            paths = [os.path.join(d, part, "results.json") for part in ("base", "new")]
            if all(map(os.path.isfile, paths)):
                accuracy = [read_accuracy(p, dataset, part, problems, seen if part == "base" else {})
                            for p, part in zip(paths, ("base", "new"))]
                if None not in accuracy:
                    runs.setdefault(dataset, {})[seed] = tuple(accuracy)
            elif os.path.isdir(os.path.join(d, "base")):
                print(f"note: {d} is unfinished (no {' and no '.join(p for p in paths if not os.path.isfile(p))}); "
                      f"left out", file=sys.stderr)
    return runs


def summarise_base2new(runs):
    """Per dataset: mean and std (population, as CoOp's parse_test_res) over seeds of base and
    new accuracy, and HM of the means; the average row is the mean over the paper's datasets
    present, HM of those means (how the paper's tables compute it)."""
    rows = {}
    for dataset, seeds in runs.items():
        acc = np.array(list(seeds.values()))  # (S, 2)
        base, new = acc.mean(0)
        rows[dataset] = dict(seeds=sorted(seeds), base=base, new=new, hm=harmonic_mean(base, new),
                             base_std=acc[:, 0].std(), new_std=acc[:, 1].std())
    paper = [d for d in PAPER_DATASETS if d in rows]
    average = None
    if paper:
        base = float(np.mean([rows[d]["base"] for d in paper]))
        new = float(np.mean([rows[d]["new"] for d in paper]))
        average = dict(datasets=paper, base=base, new=new, hm=harmonic_mean(base, new))
    return dict(datasets=rows, average=average)


# Report cells: a mean right-aligned in MEAN_W characters, then "±std" in STD_W + 1 (blank when
# there is no std); column headings are right-aligned over the means with the same widths.
MEAN_W, STD_W = 8, 5
GAP = "  "


def value_cell(mean, std=None, with_std=True):
    spread = "" if not with_std else f"±{std:<{STD_W}.2f}" if std is not None else " " * (STD_W + 1)
    return f"{mean:>{MEAN_W}.2f}" + spread


def heading_cell(name, with_std=True):
    return f"{name:>{MEAN_W}}" + (" " * (STD_W + 1) if with_std else "")


def format_table(rows):
    """rows: [label, seeds, *cells] with the heading row first; the two text columns are as
    wide as their longest entry, the cells come from value_cell/heading_cell."""
    label_w, seeds_w = (max(len(r[i]) for r in rows) for i in (0, 1))
    return [GAP.join([r[0].ljust(label_w), r[1].ljust(seeds_w), *r[2:]]).rstrip() for r in rows]


def seeds_text(seeds):
    return ",".join(map(str, seeds))


def published_cells(numbers):
    """Cells of a published (base, new, HM) row; blanks where there is none."""
    if numbers is None:
        return [" " * MEAN_W] * 3
    return [value_cell(numbers[0], with_std=False), value_cell(numbers[1], with_std=False),
            value_cell(numbers[2], with_std=False)]


def published_average(published, datasets):
    """(base, new, HM) of the published per-dataset numbers averaged over `datasets`, as our
    average row is (the 11-dataset one when all are present)."""
    base = float(np.mean([published[d][0] for d in datasets]))
    new = float(np.mean([published[d][1] for d in datasets]))
    return base, new, harmonic_mean(base, new)


def format_base2new(summary, title, method="coop"):
    """The paper's table; for PromptKD the published per-dataset PromptKD numbers sit beside ours."""
    rows, average = summary["datasets"], summary["average"]
    beside = PUBLISHED_PER_DATASET.get(method)
    table = [["Dataset", "Seeds", heading_cell("Base"), heading_cell("New"), heading_cell("HM", with_std=False)]
             + ([heading_cell("PK Base", False), heading_cell("PK New", False), heading_cell("PK HM", False)]
                if beside else [])]
    if average:
        label = "Average" if len(average["datasets"]) == len(PAPER_DATASETS) else \
            f"Average ({len(average['datasets'])}/{len(PAPER_DATASETS)})"
        table.append([label, "", value_cell(average["base"]), value_cell(average["new"]),
                      value_cell(average["hm"], with_std=False)]
                     + (published_cells(published_average(beside, average["datasets"])) if beside else []))
    ordered = [d for d in PAPER_DATASETS if d in rows] + sorted(d for d in rows if d not in PAPER_DATASETS)
    for d in ordered:
        r = rows[d]
        table.append([PAPER_DATASETS.get(d, d), seeds_text(r["seeds"]), value_cell(r["base"], r["base_std"]),
                      value_cell(r["new"], r["new_std"]), value_cell(r["hm"], with_std=False)]
                     + (published_cells(beside.get(d)) if beside else []))
    published = [[name, "", value_cell(b), value_cell(n), value_cell(h, with_std=False)]
                 for name, (b, n, h) in PUBLISHED_AVERAGES[method].items()]
    lines = format_table(table + published)
    return "\n".join([title, *lines[:len(table)], PUBLISHED_NOTES[method], *lines[len(table):]])


def collect_xd(root, problems, seen):
    """{target: {seed: accuracy}} from <root>/<target>/seed<S>/results.json."""
    runs = {}
    for target in dataset_dirs(root):
        for seed, d in seed_dirs(os.path.join(root, target), problems):
            path = os.path.join(d, "results.json")
            if os.path.isfile(path):
                accuracy = read_accuracy(path, target, "all", problems, seen)
                if accuracy is not None:
                    runs.setdefault(target, {})[seed] = accuracy
    return runs


def report(root):
    """Print and write <root>/report.json: base2new layout when the runs have base/ and new/,
    else one accuracy per dataset (xd). Every results.json is checked first (readable, a
    number for accuracy, the dataset/subsample/split its folder says; no stray folders):
    each problem is printed on its own line and no report is made."""
    if not os.path.isdir(root):
        raise SystemExit(f"--report {root!r} is not a directory")
    problems, seen = [], {}
    runs = collect_base2new(root, problems, seen)
    xd = {} if runs or problems else collect_xd(root, problems, seen)
    methods = sorted({method for method, _ in seen})
    if len(methods) > 1:
        problems.append(f"{root} mixes methods ({', '.join(f'{m}: {p}' for (m, _), p in sorted(seen.items()))}); "
                        f"one table per method: move one method's runs elsewhere")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        raise UserError(f"--report {root}: {len(problems)} problem(s) above; no report made")
    method = methods[0] if methods else "coop"
    selections = sorted({s for _, s in seen if s})
    selection = "Model selection: " + ("; ".join(f"{s} ({train.SELECTIONS.get(s, s)})" for s in selections)
                                       if selections else "not recorded")
    if runs:
        summary = dict(summarise_base2new(runs), method=method, selection=selections)
        text = format_base2new(summary, f"{METHOD_NAMES[method]}: base-to-new generalisation in {root} "
                                        f"(mean±std over seeds; HM of the mean base and new)\n{selection}", method)
    else:
        if not xd:
            raise SystemExit(f"--report {root}: no finished runs (<dataset>/seed<S>/results.json)")
        order = [t for t in XD_ORDER if t in xd] + sorted(t for t in xd if t not in XD_ORDER)
        summary = {t: dict(seeds=sorted(xd[t]), accuracy=float(np.mean(list(xd[t].values()))),
                           std=float(np.std(list(xd[t].values())))) for t in order}
        beside = PUBLISHED_XD.get(method)
        table = [["Dataset", "Seeds", heading_cell("Accuracy")] + ([heading_cell("PromptKD", False)] if beside else [])]
        for t, r in summary.items():
            table.append([t, seeds_text(r["seeds"]), value_cell(r["accuracy"], r["std"])]
                         + ([value_cell(beside[t], with_std=False) if t in beside else " " * MEAN_W]
                            if beside else []))
        note = ["PromptKD: its published transductive cross-dataset accuracy (PromptKD README; full unlabelled "
                "target train sets)"] if beside else []
        text = "\n".join([f"{METHOD_NAMES[method]}: accuracy in {root} (mean±std over seeds)\n{selection}",
                          *format_table(table), *note])
    print(text)
    train.write_json(summary, os.path.join(root, "report.json"))
    return summary


def check_args(p, args):
    """Flag errors argparse cannot see; p.error exits with status 2 and the usage line."""
    train.check_ranges(p, args, dict(dist_timeout=train.DIST_TIMEOUT))
    if args.benchmark:
        train.check_ranges(p, args, train.BENCHMARK_RULES)
        if args.teacher_clip is not None and args.teacher_clip not in clip_model.CONFIGS:
            p.error(f"--benchmark --teacher-clip {args.teacher_clip!r}: expected one of {', '.join(clip_model.CONFIGS)}")
        return
    if args.zeroshot == bool(args.checkpoint):
        p.error("give exactly one of --checkpoint PATH and --zeroshot")
    if args.checkpoint and not os.path.exists(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint!r} does not exist")
    train.check_ranges(p, args, dict(batch_size=train.POSITIVE, seed=train.NON_NEGATIVE, workers=train.NON_NEGATIVE,
                                     epoch=train.POSITIVE))
    if args.epoch is not None and not (args.checkpoint and os.path.isdir(args.checkpoint)):
        p.error("--epoch N picks model.pth.tar-N in an authors' run folder; a train.py checkpoint is one epoch "
                "(best.pt: best val, last.pt: last epoch)")
    if args.clip:
        train.check_clip_flag(p, args.clip)
    if args.output_dir:
        try:
            train.check_output_dir(args.output_dir)
        except UserError as e:
            p.error(str(e))


@train.exit_on_user_error
def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.report:
        return report(args.report)
    check_args(p, args)
    if args.benchmark:
        args.batch_size = args.batch_size or 32
        # the --method's recipe (PromptKD: --depth, --teacher-clip, ...) under the flags given here
        given = {k: v for k, v in vars(args).items() if v is not None}
        return train.benchmark(argparse.Namespace(**dict(train_defaults(args.method or "coop"), **given)),
                               training=False)
    return train.run_and_teardown(run, args)


if __name__ == "__main__":
    main()
