"""Train a prompt learner (--method: CoOp + TextRefiner by default, another host of
textrefiner.METHODS, or your own MODULE:CLASS / path/to/file.py:CLASS) on a CoOp benchmark, with
the method's recipe unless flags say otherwise.

    python train.py --dataset caltech101 --root /data --subsample base --seed 1 \
        --output-dir output/coop/base2new/caltech101/seed1/base
    python train.py --method promptkd --teacher /teachers --dataset dtd --root /data \
        --subsample base --output-dir output/promptkd/base2new/dtd/seed1/base  # + TextRefiner
    torchrun --standalone --nproc_per_node=4 train.py ...   # the global --batch-size over 4 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py
    python train.py ... --resume                             # continue an interrupted run
    python train.py --few-shot --shots 4 --dataset dtd ...   # the method's few-shot recipe
    python train.py --method examples/clip_adapter.py:CLIPAdapter --ratio 0.5 ...  # your method

Flags: the run's own, and one per field of the --method's recipe (unset: the recipe's value;
`python train.py --method M --help` lists them).

Writes into --output-dir (the files and their rules: outputs.py):
    last.pt       after every epoch, atomically: trainable state, optimizer, scaler, epoch, args,
                  class names, every rank's RNG states, the best epoch's accuracy and state
    best.pt       the same at the best epoch on the selection split (not with --selection last)
    log.jsonl     one line per epoch: epoch, lr, the method's loss terms, val_acc, seconds
    results.json  the selected model on the test split: accuracy, macro_f1, per_class_accuracy,
                  classnames, num_images, num_classes, method (and its title), shots,
                  selection, the run's flags
    .lock         while a run or an evaluation holds the folder
"""
import argparse
import dataclasses
import datetime
import inspect
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import clip_model
import data
import features
import flags
import outputs
import textrefiner
from data import UserError
from textrefiner import METHODS, NON_NEGATIVE, POSITIVE

# DDP's broadcast_buffers became forward_sync_buffers in torch 2.13; drop this when GPU hosts
# have >= 2.13.
DDP_NO_BUFFER_SYNC = next(name for name in ("forward_sync_buffers", "broadcast_buffers")
                          if name in inspect.signature(DDP).parameters)
# Flags besides the recipe's that define the computation: a resumed run must repeat them.
RUN_KEYS = ("method", "dataset", "clip", "shots", "seed", "subsample", "precision", "xd",
            "eval_decode")
# What a run writes into --output-dir.
OUTPUT_FILES = ("last.pt", "best.pt", "log.jsonl", "results.json")


# ----------------------------------------------------------------------------- flags


def get_parser(spec="coop"):
    """train.py's flags, the recipe's of --method `spec` among them."""
    p = argparse.ArgumentParser(prog="train.py", allow_abbrev=False, description=(
        "Train a prompt learner (default: CoOp + TextRefiner) with its recipe; every recipe flag "
        "left unset takes the --method's value."))
    p.add_argument("--method", default="coop", help=f"one of {', '.join(METHODS)}, or your own: "
                                                    f"MODULE:CLASS or path/to/file.py:CLASS")
    p.add_argument("--dataset", help=f"one of {', '.join(data.DATASETS)}")
    p.add_argument("--root", help="data root holding the CoOp dataset folders")
    p.add_argument("--clip", default="ViT-B/16", help="official CLIP name or a weights file")
    p.add_argument("--shots", type=int, default=16, help="images per class (<= 0: all)")
    p.add_argument("--seed", type=flags.ranged(int, flags.SEEDS), default=1)
    p.add_argument("--subsample", default="all", choices=data.SUBSAMPLES,
                   help="the classes evaluated (and trained on, unless the method is transductive)")
    protocol = p.add_mutually_exclusive_group()
    protocol.add_argument("--xd", action="store_true",
                          help="the method's cross-dataset recipe (its Recipe.xd values)")
    protocol.add_argument("--few-shot", action="store_true", help="the method's few-shot recipe "
                          "for --shots on --dataset (its Recipe.few_shot values)")
    p.add_argument("--output-dir", help="checkpoints, log.jsonl and results.json go here")
    p.add_argument("--resume", action="store_true",
                   help="continue from <output-dir>/last.pt if present")
    p.add_argument("--keep-decoded", type=flags.ranged(float, NON_NEGATIVE), default=4.0,
                   metavar="GIB", help="decoded training images kept in memory, per rank (GiB; "
                                       "past it, decoded every epoch; same results either way)")
    p.add_argument("--eval-batch-size", type=flags.ranged(int, POSITIVE), default=100,
                   help="per rank")
    p.add_argument("--log-interval", type=flags.ranged(int, POSITIVE), default=20,
                   help="steps between progress lines")
    flags.add_run_flags(p)
    flags.add_image_flags(p)
    flags.add_recipe_flags(p, flags.load_method(spec), spec)
    return p


def resolve_args(p, args, Method):
    """Flag errors argparse cannot see (p.error: status 2 and the usage line); the recipe filled
    in."""
    for name in ("dataset", "root", "output_dir"):
        if getattr(args, name) is None:
            p.error(f"{flags.flag(name)} is required")
    if args.dataset not in data.DATASETS:
        p.error(f"--dataset {args.dataset!r}: expected one of {', '.join(data.DATASETS)}")
    if not os.path.isdir(args.root):
        p.error(f"--root {args.root!r} is not a directory")
    flags.fill_recipe(p, args, Method)
    flags.check_weights_flag(p, args.clip)
    try:
        outputs.check_output_dir(args.output_dir, files=OUTPUT_FILES)
    except UserError as e:
        p.error(str(e))


# ----------------------------------------------------------------------------- runtime


def setup_runtime(args):
    """-> (rank, world_size, device, group). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK."""
    device = flags.chosen_device(args.device)
    if int(os.environ.get("RANK", -1)) == -1:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # --device cuda:1: the current device too (Triton)
        return 0, 1, device, None
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    # The model's own collectives (BN statistics, cache partials) get a group of their own so
    # they never interleave with DDP's gradient buckets.
    return dist.get_rank(), dist.get_world_size(), device, dist.new_group(timeout=timeout)


@contextmanager
def collective(what):
    """A collective that times out inside the block (gloo raises it; NCCL's watchdog aborts with its
    own message) ends the run with one line naming the rank, how long it waited, and `what`."""
    start = time.perf_counter()
    try:
        yield
    except RuntimeError as e:
        if not (dist.is_initialized() and "timed out" in str(e).lower()):
            raise
        waited, cause = time.perf_counter() - start, str(e).splitlines()[0][:200]
        raise SystemExit(f"rank {dist.get_rank()}: timed out after {waited:.0f} s (--dist-timeout) "
                         f"in {what}: another rank stalled or died ({cause})") from None


def autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def decode_device(args, device):
    """Where evaluation JPEGs are decoded (--eval-decode): None (PIL, in the loader workers), or
    the run's CUDA device."""
    if args.eval_decode == "cpu":
        return None
    if device.type != "cuda":
        raise UserError(f"--eval-decode cuda: this run computes on {device}; decoding on the GPU "
                        f"needs a CUDA --device")
    return device


def default_precision(args, device):
    return args.precision or ("bf16" if device.type == "cuda" else "fp32")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(device):
    """This process's RNG states; of the GPUs only the one it computes on (a run resumed with fewer
    visible GPUs can restore it)."""
    py, npy = random.getstate(), np.random.get_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return dict(python=[py[0], list(py[1]), py[2]], torch=torch.get_rng_state(), cuda=cuda,
                numpy=[npy[0], torch.from_numpy(npy[1].astype(np.int64)), *npy[2:]])


def set_rng_state(state, device):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], npy[1].numpy().astype(np.uint32), *npy[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def on_rank0(check, rank, world_size, what):
    """check() on rank 0 (the output folder's), its UserError or OSError raised on every rank: the
    message is broadcast in the collective `what` names. -> check()'s result on rank 0, or None."""
    result, error = None, None
    if rank == 0:
        try:
            result = check()
        except (UserError, OSError) as e:
            error = str(e)
    if world_size > 1:
        verdict = [error]
        with collective(what):
            dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error:
        raise UserError(error)
    return result


@contextmanager
def output_lock(folder, rank, world_size):
    """The block with `folder` held by rank 0; a refusal is raised on every rank."""
    lock = on_rank0(lambda: outputs.acquire_output_lock(folder), rank, world_size,
                    "the broadcast of the output-folder lock")
    try:
        yield
    finally:
        if lock:
            outputs.release_output_lock(lock)

# ----------------------------------------------------------------------------- evaluation


def metrics(confusion, classnames):
    """confusion[true, pred] counts -> accuracy, macro-F1 over the classes that occur as a true
    label (as Dassl's), per_class_accuracy (aligned with classnames; None: a class without an
    image)."""
    cm = confusion.double().cpu()  # (C, C)
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    present = support > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    per_class = [(100 * tp[i] / support[i]).item() if support[i] > 0 else None
                 for i in range(len(classnames))]
    total = int(cm.sum().item())
    return dict(accuracy=100 * tp.sum().item() / max(total, 1),
                macro_f1=100 * f1[present].mean().item() if present.any() else 0.0,
                per_class_accuracy=per_class, classnames=list(classnames), num_images=total,
                num_classes=len(classnames))


@torch.no_grad()
def eval_step(model, images, device, precision, features=None):
    """A uint8 loader batch through a model in eval mode -> (logits (B, C), image features or
    None); given stored features instead, the image tower is skipped (evaluate(), bench.py)."""
    with autocast(device, precision):
        if not textrefiner.reuses_image_features(model):
            return model(data.normalize(images.to(device, non_blocking=True))), None
        if features is None:
            features = model.image_features(data.normalize(images.to(device, non_blocking=True)))
        return model.logits(features), features


@torch.no_grad()
def evaluate(model, loader, classnames, device, precision, feature_cache=None, rows=None):
    """Top-1 metrics over this rank's shard, counts summed over all ranks. rows: the classifier rows
    of `classnames` when the model classifies more classes (a transductive run), else None.
    feature_cache: a features.FeatureCache (a run's, or a table worker's). A model with frozen
    image features gives an image the same features at every evaluation (deterministic eval
    transform): the first pass over a loader stores them, later passes (of this run, or of later
    runs sharing the cache) skip decoding and the tower, bitwise the same."""
    model.eval()
    C = len(classnames)
    rows = None if rows is None else torch.as_tensor(rows, device=device)
    confusion = torch.zeros(C * C, dtype=torch.int64, device=device)
    cached = feature_cache is not None and textrefiner.reuses_image_features(model)
    key = feature_cache.key(model, loader, precision, device) if cached else None
    stored = feature_cache.get(key, device) if cached else None
    if stored is not None:  # the labels of this run's classes (base, new) are the items'
        labels = torch.tensor([item.label for item in loader.dataset.items])
        batches = zip(stored, labels.split(loader.batch_size))
    computed = []  # [features (B, D) on the device]
    for inputs, labels in loader if stored is None else batches:
        if stored is None:
            logits, encoded = eval_step(model, inputs, device, precision)  # (B, C), (B, D)
            if cached:
                computed.append(encoded)
        else:
            logits, _ = eval_step(model, None, device, precision, features=inputs)
        if rows is not None:
            logits = logits.index_select(1, rows)  # (B, n) -> (B, C)
        idx = labels.to(device, non_blocking=True) * C + logits.argmax(1)
        confusion.index_add_(0, idx, torch.ones_like(idx))
    if cached and stored is None:
        feature_cache.put(key, computed)
    if dist.is_initialized():
        with collective("the all-reduce of the evaluation counts"):
            dist.all_reduce(confusion)
    return metrics(confusion.view(C, C), classnames)

# ----------------------------------------------------------------------------- training


def make_optimizer(params, recipe):
    """The recipe's optimizer: SGD with momentum, or AdamW (adapters); weight decay on every
    trainable tensor."""
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay)


def lr_at(epoch, args):
    """Dassl's constant warm-up around CosineAnnealingLR(T_max=epochs), stepped once per epoch:
    the first warmup_epochs at warmup_lr, then
    lr * (1 + cos(pi * (epoch - warmup_epochs) / epochs)) / 2."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr
    return args.lr * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / args.epochs)) / 2


def train_step(model, images, labels, optimizer, scaler, device, precision):
    """One optimisation step on a uint8 loader batch -> the model's output dict. train() and the
    benchmarks run it."""
    images = data.normalize(images.to(device, non_blocking=True))
    labels = labels.to(device, non_blocking=True)
    with autocast(device, precision):
        out = model(images, labels)
    check_output(model.module if isinstance(model, DDP) else model, out)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    return out


def check_output(model, out):
    """A method's train_forward output, before the backward pass: a dict holding each of its
    loss_keys as a tensor, "loss" with a graph to the trainable tensors (UserError naming the method
    and what its author must change)."""
    name, keys = type(model).__name__, ("loss", *model.loss_keys)
    if not isinstance(out, dict):
        raise UserError(f"{name}.train_forward returned a {type(out).__name__}; it must return a "
                        f"dict holding {', '.join(dict.fromkeys(keys))}")
    for key in dict.fromkeys(keys):
        if not torch.is_tensor(out.get(key)):
            raise UserError(f"{name}.train_forward returned no tensor {key!r} (its keys: "
                            f"{', '.join(map(str, out))}); return it, or take it out of "
                            f"{name}.loss_keys")
    if not out["loss"].requires_grad:
        raise UserError(f"{name}.train_forward's 'loss' does not require grad: it was computed "
                        f"under torch.no_grad() or from detached tensors; compute it from the "
                        f"trainable tensors")


def resume_state(path, args):
    """last.pt's checkpoint, its flags compared with this run's: the method, RUN_KEYS and the
    recipe (a weights file by its SHA-256; a flag the checkpoint predates is not compared)."""
    ckpt = outputs.load_checkpoint(path)
    recorded = flags.recorded_flags(ckpt["args"])
    if recorded.get("method") != args.method:
        raise UserError(f"--resume: {path} is a --method {recorded.get('method')} run, this "
                        f"command trains --method {args.method}; choose another --output-dir")
    names = RUN_KEYS + tuple(flags.recipe_field_names(flags.load_method(args.method)))
    keys = [k + "_sha256" if getattr(args, k + "_sha256", None) and recorded.get(k + "_sha256")
            else k for k in names]
    changed = {k: (recorded[k], getattr(args, k))
               for k in keys if k in recorded and recorded[k] != getattr(args, k)}
    if changed:
        raise UserError(f"--resume: flags differ from the run in {path} (checkpoint value, new "
                        f"value): {changed}")
    return ckpt


@dataclasses.dataclass
class Run:
    """A training run as setup() hands it to the loop."""
    rank: int
    world_size: int
    device: torch.device
    paths: dict  # last.pt, best.pt, log.jsonl, results.json in --output-dir
    splits: data.RunData
    raw_model: torch.nn.Module
    model: torch.nn.Module  # raw_model, or DDP around it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_loader: data.TrainLoader
    val_loader: torch.utils.data.DataLoader  # None: the last epoch is the selected one
    test_loader: torch.utils.data.DataLoader
    selection: str  # best-val or best-test (the best epoch on that split), or last
    feature_cache: features.FeatureCache = None  # the val/test image features of a frozen tower
    start_epoch: int = 0
    best: dict = dataclasses.field(default_factory=lambda: dict(val_acc=-1.0, epoch=-1))
    best_state: dict = None  # the best epoch's trainable state

    def print0(self, text):  # rank 0 speaks for all
        if self.rank == 0:
            print(text)


def setup(args, rank, world_size, device, group):
    """The run's data, model, optimizer and loaders, its output folder checked; with --resume,
    as last.pt left them."""
    args.precision = default_precision(args, device)
    paths = {name: os.path.join(args.output_dir, name) for name in OUTPUT_FILES}
    Method = flags.load_method(args.method, args.method_file)
    splits = data.run_splits(args.dataset, args.root, args.shots, args.seed, args.subsample,
                             Method.transductive)
    if not splits.train:
        raise UserError(f"--dataset {args.dataset} has no train split (test-only dataset)")
    if not splits.test:
        raise UserError(f"--dataset {args.dataset} ({args.subsample} classes): the test split is "
                        f"empty; the final test would have no image")
    recipe = flags.prepare_recipe(Method, args, splits.all_classnames)
    args.clip_sha256 = clip_model.weights_sha256(args.clip)  # eval.py and --resume compare it
    check_own_results(paths)
    if os.path.exists(paths["last.pt"]) and not args.resume:
        raise UserError(f"{paths['last.pt']} exists: pass --resume to continue that run, or choose "
                        f"another --output-dir")
    ckpt = resume_state(paths["last.pt"], args) if os.path.exists(paths["last.pt"]) else None
    seed_everything(args.seed)  # the same on every rank: identical initialisation
    clip = flags.load_clip(args.clip)
    raw_model = flags.build_model(Method, clip, splits.classnames, recipe).to(device)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    if not params:
        frozen = ", ".join(Method.frozen)
        raise UserError(f"--method {args.method}: {Method.__name__} has no trainable tensor (no "
                        f"parameter that requires grad outside its frozen {frozen}); its build "
                        f"must create one, e.g. an nn.Parameter")
    model = raw_model
    if world_size > 1:
        raw_model.set_process_group(group)
        # No buffer broadcast per forward: BN statistics and the cache stay equal through the
        # model's own reductions (synced once at construction).
        with collective("DDP's set-up (the parameter and buffer broadcast from rank 0)"):
            model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None,
                        **{DDP_NO_BUFFER_SYNC: False})
    optimizer = make_optimizer(params, recipe)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    pin = device.type == "cuda"  # pinned memory on the CPU: a CUDA context for nothing
    resolution = raw_model.clip.config.image_resolution
    decode_on = decode_device(args, device)
    use_val = bool(getattr(splits, splits.select_split)) and args.selection == "best"
    # A checkpoint: the trainable state (with best.pt, the best epoch's too) and SGD's momentum.
    state = [*raw_model.trainable_state_dict().values()] * (2 if use_val else 1)
    size = sum(t.nbytes for t in state + params)
    on_rank0(lambda: outputs.check_checkpoint_room(args.output_dir, size, use_val), rank,
             world_size, "the broadcast of the free-space check of --output-dir")
    keep = 0 if args.no_feature_cache else int(args.keep_decoded * 2**30)  # bytes
    train_loader = data.build_train_loader(splits.train, args.batch_size, resolution, args.seed,
                                           rank=rank, world_size=world_size, workers=args.workers,
                                           pin_memory=pin, keep_decoded=keep)

    def eval_loader(split):
        return data.build_eval_loader(getattr(splits, split), args.eval_batch_size, resolution,
                                      rank=rank, world_size=world_size, workers=args.workers,
                                      pin_memory=pin, decode_on=decode_on)
    run = Run(rank, world_size, device, paths, splits, raw_model, model, optimizer, scaler,
              train_loader, eval_loader(splits.select_split) if use_val else None,
              eval_loader("test"), f"best-{splits.select_split}" if use_val else "last",
              features.for_run(args.no_feature_cache))
    if ckpt is None:
        if rank == 0 and os.path.exists(paths["log.jsonl"]):
            os.remove(paths["log.jsonl"])  # a fresh run owns its log
        return run
    raw_model.load_trainable_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][rank if len(ckpt["rng"]) == world_size else 0], device)
    # The best model comes from last.pt itself, never from best.pt: a crash between the two
    # writes leaves a best.pt of another epoch than ckpt["best"] names.
    run.start_epoch, run.best, run.best_state = ckpt["epoch"] + 1, ckpt["best"], ckpt["best_model"]
    if rank == 0:
        outputs.rewind_log(paths["log.jsonl"], ckpt["log"])
    run.print0(f"resumed from {paths['last.pt']} after epoch {ckpt['epoch']}")
    return run


def check_own_results(paths):
    """A results.json in the output folder must be of its checkpoints (a run resumed or moved)."""
    old = outputs.read_json(paths["results.json"])
    if old is None and os.path.exists(paths["results.json"]):
        raise UserError(f"{paths['results.json']} is no readable results.json; choose another "
                        f"--output-dir, or move it away")
    if old is not None and all(
            outputs.results_match(old, checkpoint=paths[name]) for name in ("best.pt", "last.pt")):
        raise UserError(f"{paths['results.json']} holds the results of another run (of "
                        f"{old.get('checkpoint')!r}); choose another --output-dir, or move it away")


def train(args):
    """The run args describe (resolved flags), its output folder held -> the test results."""
    rank, world_size, device, group = setup_runtime(args)
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world_size} "
                        f"ranks")
    with output_lock(args.output_dir, rank, world_size):
        run = setup(args, rank, world_size, device, group)
        raw_model, splits, steps = run.raw_model, run.splits, len(run.train_loader)
        run.print0(f"{args.method} on {args.dataset}: {len(splits.classnames)} classes, "
                   f"{len(splits.train)} train images; {args.subsample} classes evaluated "
                   f"({len(splits.eval_classnames)}): {len(splits.val)} val, {len(splits.test)} "
                   f"test images; {steps} steps/epoch; {world_size} rank(s) on {device}, "
                   f"{args.precision}; model selection: {outputs.SELECTIONS[run.selection]}")
        t_run, done = time.perf_counter(), 0
        for epoch in range(run.start_epoch, args.epochs):
            t_epoch, lr = time.perf_counter(), lr_at(epoch, args)
            for param_group in run.optimizer.param_groups:
                param_group["lr"] = lr
            run.train_loader.set_epoch(epoch)
            run.model.train()
            sums = torch.zeros(len(raw_model.loss_keys), dtype=torch.float64, device=device)
            for step, (images, labels) in enumerate(run.train_loader):
                out = train_step(run.model, images, labels, run.optimizer, run.scaler, device,
                                 args.precision)
                sums += torch.stack([out[k].detach().double() for k in raw_model.loss_keys])
                done += 1
                if (step + 1) % args.log_interval == 0 or step + 1 == steps:
                    losses = mean_losses(run, sums, step + 1, f"epoch {epoch + 1} step {step + 1}")
                    rate = done / (time.perf_counter() - t_run)
                    eta = ((args.epochs - epoch) * steps - step - 1) / rate / 60
                    run.print0(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps} loss "
                               f"{losses[0]:.4f} lr {lr:.3e} {rate:.2f} it/s eta {eta:.1f} min")
            raw_model.epoch_end(epoch, args.epochs)  # e.g. PromptSRC's prompt aggregation
            record = dict(epoch=epoch, lr=lr, **dict(zip(raw_model.loss_keys, losses)))
            if run.val_loader is not None:
                record["val_acc"] = evaluate(raw_model, run.val_loader, splits.eval_classnames,
                                             device, args.precision, run.feature_cache,
                                             splits.rows)["accuracy"]
                if record["val_acc"] > run.best["val_acc"]:
                    run.best = dict(val_acc=record["val_acc"], epoch=epoch)
                    run.best_state = {k: v.detach().clone()
                                      for k, v in raw_model.trainable_state_dict().items()}
            record["seconds"] = time.perf_counter() - t_epoch
            save_checkpoint(run, args, epoch, record)
            run.print0(json.dumps(record))
        return final_test(run, args)


def mean_losses(run, sums, steps, where):
    """Loss terms summed over `steps` steps -> their means over steps and ranks. All ranks see a
    non-finite loss at the same step and stop there, keeping the last good checkpoint."""
    mean = sums.clone()
    if run.world_size > 1:
        dist.all_reduce(mean)
    mean = (mean / (steps * run.world_size)).tolist()
    if not all(map(math.isfinite, mean)):
        last = run.paths["last.pt"]
        kept = f"the last good checkpoint is {last}" if os.path.exists(last) else \
            "no checkpoint was written"
        raise SystemExit(f"non-finite loss {mean[0]} at {where}: stopping; {kept} (try a lower "
                         f"--lr or --precision fp32)")
    return mean


def save_checkpoint(run, args, epoch, record):
    """last.pt (and best.pt at a new best) with every rank's RNG states, then the log line."""
    rngs = [rng_state(run.device)] * run.world_size
    if run.world_size > 1:
        with collective("the all-gather of the RNG states for the checkpoint"):
            dist.all_gather_object(rngs, rng_state(run.device))
    ckpt = dict(model=run.raw_model.trainable_state_dict(), optimizer=run.optimizer.state_dict(),
                scaler=run.scaler.state_dict(), epoch=epoch, args=vars(args),
                selection=run.selection, rng=rngs, best=run.best, best_model=run.best_state,
                log=record, classnames=run.splits.classnames)  # predict.py's default classes
    if run.rank == 0:  # best.pt first: last.pt, what --resume trusts, once the epoch is on disk
        if run.best["epoch"] == epoch:
            outputs.save_atomic(ckpt, run.paths["best.pt"])
        outputs.save_atomic(ckpt, run.paths["last.pt"])
        with open(run.paths["log.jsonl"], "a") as f:
            f.write(json.dumps(record) + "\n")


def final_test(run, args):
    """The selected model (the last epoch's with --selection last) on the test split -> results."""
    selected = run.best_state is not None
    if selected:
        run.raw_model.load_trainable_state_dict(run.best_state)
    results = evaluate(run.raw_model, run.test_loader, run.splits.eval_classnames, run.device,
                       args.precision, run.feature_cache, run.splits.rows)
    Method = flags.load_method(args.method, args.method_file)
    inputs = flags.input_record(Method, vars(args))
    tested = os.path.abspath(run.paths["best.pt" if selected else "last.pt"])  # eval.py's too
    results.update(split="test", dataset=args.dataset, subsample=args.subsample, method=args.method,
                   title=Method.title or Method.__name__, shots=args.shots,
                   refiner=bool(getattr(args, "refiner", False)),
                   train_classes=len(run.splits.classnames),
                   train_images=len(run.splits.train), selection=run.selection, checkpoint=tested,
                   checkpoint_sha256=clip_model.sha256(tested) if run.rank == 0 else None,
                   epoch=run.best["epoch"] if selected else args.epochs - 1, **inputs,
                   args=vars(args))
    if run.rank == 0:
        outputs.write_json(results, run.paths["results.json"])
    run.print0(f"test ({args.subsample}): accuracy {results['accuracy']:.2f} macro-F1 "
               f"{results['macro_f1']:.2f} on {results['num_images']} images")
    return results


def one_line(error):
    """A UserError's message as one line (a loader worker's has its traceback: its last line)."""
    text = str(error).strip()
    return text.splitlines()[-1].split(": ", 1)[-1] if "Traceback" in text else text


@contextmanager
def command_line():
    """The block as a command line: a UserError is one line on stderr and exit status 2, as
    argparse's own errors; the process group setup_runtime opened is closed, also after an error."""
    try:
        yield
    except UserError as e:
        rank = os.environ.get("RANK", "0")
        print(f"error{'' if rank == '0' else f' (rank {rank})'}: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def parse_args(argv=None, step=False):
    """train.py's flags, resolved; step (a step of tables.py): a usage error is a one-line
    UserError."""
    spec = flags.method_spec(argv)
    Method = flags.load_method(spec)
    p = get_parser(spec)
    if step:
        flags.raise_errors(p, "train.py")
    args = flags.parse_known(p, argv, spec)
    resolve_args(p, args, Method)
    args.method_file = flags.method_file(spec)
    return args


def main(argv=None):
    with command_line():
        return train(parse_args(argv))


if __name__ == "__main__":
    main()
