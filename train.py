"""Train CoOp + TextRefiner or PromptKD + TextRefiner on one of the CoOp benchmarks (the
papers' recipes by default: one row per --method in METHODS; explicit flags win).

One process (GPU or CPU):
    python train.py --dataset caltech101 --root /data --subsample base --seed 1 \
        --output-dir output/base2new/caltech101/seed1/base
PromptKD + TextRefiner (SPEC 11): a student distilled on the unlabelled shots of all classes from
PromptKD's released teacher (a file, or the folder of the released teachers):
    python train.py --method promptkd --teacher /teachers --dataset dtd --root /data --subsample base \
        --output-dir output/promptkd/base2new/dtd/seed1/base
    python train.py --method promptkd --teacher /teachers --dataset dtd --root /data --subsample all \
        --shots 0 --depth 3 --output-dir output/promptkd/xd/dtd/seed1          # cross-dataset
Several GPUs on one node (the global --batch-size is split across the ranks):
    torchrun --standalone --nproc_per_node=4 train.py --dataset imagenet --root /data ...
Several nodes (run on every node, same rendezvous endpoint):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train.py ...
Continue an interrupted run (same flags, picks up <output-dir>/last.pt):
    python train.py ... --resume
A second run into the same --output-dir is refused while the first holds it (<output-dir>/.lock;
see acquire_output_lock); a stalled rank ends the others after --dist-timeout seconds.
Throughput, no data or weights needed (random ViT-B/16, batch 32):
    python train.py --benchmark --num-classes 100
    python train.py --method promptkd --benchmark --batch-size 8   # + a random ViT-L/14 teacher
    python train.py --benchmark --benchmark-clip tiny --device cpu   # smoke test
A whole base2new training run (train + val + test + checkpoints) on synthetic 500x375 photo-like
JPEGs, wall time split by phase, loader images/s vs model images/s:
    python train.py --benchmark-run                                  # ViT-B/16 size, 20 classes
    python train.py --benchmark-run --benchmark-clip tiny --device cpu --workers 2   # 1-2 min on CPU

Writes into --output-dir: last.pt (written atomically after every epoch: the trainable
state with SPEC 10 names, optimizer, scheduler, epoch, args, RNG states, the best val
accuracy and the best-val model's trainable state, so --resume needs nothing else),
best.pt (the same for the epoch of best val_acc, the selection split's accuracy: coop's val,
promptkd's test of the evaluated classes; for users; written before last.pt; not with
--selection last),
log.jsonl (one line per epoch, written after that epoch's checkpoint) and results.json
(test split, selected model; method, selection, teacher file and SHA-256).
Evaluation helpers (evaluate, metrics, distributed setup) live here; eval.py
imports them.
"""
import argparse
import collections
import dataclasses
import datetime
import functools
import inspect
import json
import math
import os
import pickle
import random
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import clip_model
import data
import textrefiner
from data import MissingData, UserError
from textrefiner import TextRefinerCLIP, ZeroShotCLIP

# torch 2.13 renamed DDP's broadcast_buffers to forward_sync_buffers; GPU hosts may run older.
DDP_NO_BUFFER_SYNC = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else "broadcast_buffers")
# Arguments that define the computation; a resumed run must use the same values.
RECIPE_KEYS = ("method", "dataset", "clip", "shots", "seed", "subsample", "epochs", "batch_size", "lr",
               "momentum", "weight_decay", "warmup_epochs", "warmup_lr", "precision", "n_ctx",
               "ctx_init", "cache_size", "alpha", "cache_momentum", "topk", "semantic_weight",
               "reg_weight", "no_refiner", "selection", "teacher_sha256", "teacher_clip", "depth",
               "kd_weight", "temperature")



# torch.distributed's own default is 30 min; a stalled rank (an NFS hang) is reported sooner.
DIST_TIMEOUT_FLAG = dict(type=float, default=900.0, metavar="SECONDS",
                         help="torchrun: a collective that waits longer for another rank fails with a "
                              "message naming the rank and the collective (default 900)")


def get_parser():
    p = argparse.ArgumentParser(description="Train CoOp + TextRefiner or PromptKD + TextRefiner (defaults: the "
                                            "papers' recipes, one row per --method).")
    recipe = "default: the --method's recipe"
    p.add_argument("--method", default="coop", choices=tuple(METHODS),
                   help="coop: CoOp + TextRefiner (SPEC 5); promptkd: PromptKD + TextRefiner, a student distilled "
                        "from a PromptSRC teacher on unlabelled images (SPEC 11)")
    p.add_argument("--dataset", help=f"one of {', '.join(data.DATASETS)}")
    p.add_argument("--root", help="data root holding the CoOp dataset folders")
    p.add_argument("--clip", default="ViT-B/16", help="official CLIP name or a weights file (promptkd: the student)")
    p.add_argument("--shots", type=int, default=16, help="images per class (<= 0: all)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--subsample", default="all", choices=data.SUBSAMPLES,
                   help="classes evaluated (coop: also the classes trained on; promptkd trains on all classes' "
                        "unlabelled images)")
    p.add_argument("--epochs", type=int, help=f"{recipe} (coop 10, promptkd 20)")
    p.add_argument("--batch-size", type=int, help=f"global batch, split across ranks; {recipe} (coop 32, promptkd 8)")
    p.add_argument("--eval-batch-size", type=int, default=100, help="per rank")
    p.add_argument("--lr", type=float, help=f"{recipe} (coop 0.002, promptkd 0.005)")
    p.add_argument("--momentum", type=float, help=f"{recipe} (0.9)")
    p.add_argument("--weight-decay", type=float, help=f"{recipe} (5e-4)")
    p.add_argument("--warmup-epochs", type=int, help=f"{recipe} (1)")
    p.add_argument("--warmup-lr", type=float, help=f"{recipe} (1e-5)")
    p.add_argument("--output-dir", help="checkpoints, log.jsonl and results.json go here")
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/last.pt if present")
    p.add_argument("--selection", choices=("best", "last"), default="best",
                   help="best: after every epoch evaluate the method's selection split (coop: val; promptkd: the "
                        "evaluated classes' test split, as released) and test the best epoch; last: the last epoch")
    p.add_argument("--no-val", action="store_true", help="the same as --selection last")
    p.add_argument("--no-feature-cache", action="store_true",
                   help="encode the val/test images at every evaluation instead of once per run "
                        "(same results; the cache holds D x 2 bytes per image on the device in bf16/fp16)")
    p.add_argument("--workers", type=int, default=4, help="data loader workers per rank")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dist-timeout", **DIST_TIMEOUT_FLAG)
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"),
                   help="autocast dtype of the frozen towers (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--log-interval", type=int, default=20, help="steps between progress lines")
    p.add_argument("--n-ctx", type=int, help=f"prompt tokens (coop: context vectors; promptkd: visual prompts "
                                             f"per block); {recipe} (4)")
    p.add_argument("--ctx-init", help='coop: "" for random context vectors (default "a photo of a")')
    p.add_argument("--cache-size", type=int, help=f"{recipe} (25)")
    p.add_argument("--alpha", type=float, help=f"{recipe} (0.2)")
    p.add_argument("--cache-momentum", type=float, help=f"{recipe} (0.8)")
    p.add_argument("--topk", type=int, help=f"{recipe} (5)")
    p.add_argument("--semantic-weight", type=float, help="coop (default 0.02)")
    p.add_argument("--reg-weight", type=float, help="coop (default 20)")
    p.add_argument("--no-refiner", action="store_true", help="plain CoOp / plain PromptKD")
    p.add_argument("--teacher", help="promptkd: a PromptKD teacher file, or the folder of PromptKD's released "
                                     "teachers (<Name>/VLPromptLearner/model-best.pth.tar picked per dataset; "
                                     "--subsample all: ImageNet-xd/VLPromptLearner_large/model.pth.tar-20)")
    p.add_argument("--teacher-clip", help="promptkd: the teacher's base CLIP, name or file (default ViT-L/14)")
    p.add_argument("--depth", type=int, help="promptkd: blocks with visual prompts (default 9; cross-dataset: 3)")
    p.add_argument("--kd-weight", type=float,
                   help="promptkd: lambda (default 200 for fgvc_aircraft, oxford_flowers, dtd; else 1000)")
    p.add_argument("--temperature", type=float, help="promptkd: distillation temperature (default 1)")
    p.add_argument("--benchmark", action="store_true", help="time synthetic training steps and exit")
    p.add_argument("--benchmark-clip", default="ViT-B/16", choices=tuple(clip_model.CONFIGS))
    p.add_argument("--benchmark-steps", type=int, default=20, help="timed rounds of --benchmark")
    p.add_argument("--benchmark-warmup", type=int, default=3, help="untimed rounds of --benchmark before those")
    p.add_argument("--num-classes", type=int,
                   help="classes in --benchmark (default 100) and in --benchmark-run's dataset (default 20)")
    p.add_argument("--benchmark-run", action="store_true",
                   help="time a whole run (start-up, data loading, compute, val, test, checkpointing) on "
                        "synthetic photo-like JPEGs and random weights (--benchmark-clip), then exit")
    p.add_argument("--benchmark-images", type=int, default=40,
                   help="--benchmark-run: images per class (a quarter test, a quarter val, the rest train)")
    p.add_argument("--benchmark-layout", default="caltech101", choices=("caltech101", "imagenet"),
                   help="--benchmark-run: dataset layout; imagenet's val split is its test split")
    return p


def check_ranges(p, args, rules):
    """rules: {flag attribute: (test, what it must be)}; p.error (status 2) at the first value
    outside its range. NaN fails every test."""
    for flag, (ok, must) in rules.items():
        value = getattr(args, flag)
        if value is not None and not ok(value):
            p.error(f"--{flag.replace('_', '-')} must be {must}, got {value}")


POSITIVE = (lambda v: v > 0, "positive")
NON_NEGATIVE = (lambda v: v >= 0 and math.isfinite(v), ">= 0")
UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
# timedelta overflows past ~2.7e12 s; a week is longer than any collective should wait
DIST_TIMEOUT = (lambda v: 0 < v <= 7 * 24 * 3600, "in (0, 604800] (at most a week)")
BENCHMARK_RULES = dict(batch_size=POSITIVE, benchmark_steps=POSITIVE, num_classes=POSITIVE,
                       benchmark_warmup=NON_NEGATIVE)


def check_output_dir(path, flag="--output-dir"):
    """Fail at start, not after the work, when path cannot become a writable directory."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a file, not a directory; choose another {flag}")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path!r}: {existing} is not a writable directory")


def recorded(run_args, key):
    """A run's value of key from its checkpoint's args; checkpoints written before --method and
    --selection existed ran CoOp and selected as their --no-val said."""
    if key in run_args:
        return run_args[key]
    return dict(method="coop", selection="last" if run_args.get("no_val") else "best").get(key)


def check_args(p, args):
    """Flag errors argparse cannot see; p.error exits with status 2 and the usage line. Fills
    the recipe flags left at None from the --method's row first."""
    apply_recipe(p, args)
    if args.no_val:
        args.selection = "last"
    check_ranges(p, args, dict(dist_timeout=DIST_TIMEOUT))
    if args.benchmark or args.benchmark_run:
        check_ranges(p, args, BENCHMARK_RULES)
        if args.benchmark_run and METHODS[args.method].teacher:
            p.error(f"--benchmark-run times --method coop runs (--method {args.method} needs a teacher file)")
        if METHODS[args.method].teacher and args.teacher_clip not in clip_model.CONFIGS:
            p.error(f"--benchmark --teacher-clip {args.teacher_clip!r}: expected one of {', '.join(clip_model.CONFIGS)} "
                    f"(random weights of that size)")
        args.teacher_sha256 = None  # no teacher file: random weights
        if args.benchmark_run:  # the real train(): its flags have the same ranges
            check_run_ranges(p, args)
            fewest = 2 if args.benchmark_layout == "imagenet" else 3  # a test (and a val) image, one to train
            check_ranges(p, args, dict(benchmark_images=(lambda v: v >= fewest, f"at least {fewest}")))
        return
    for flag in ("dataset", "root", "output_dir"):
        if getattr(args, flag) is None:
            p.error(f"--{flag.replace('_', '-')} is required (unless --benchmark)")
    if args.dataset not in data.DATASETS:
        p.error(f"--dataset {args.dataset!r}: expected one of {', '.join(data.DATASETS)}")
    if not os.path.isdir(args.root):
        p.error(f"--root {args.root!r} is not a directory")
    check_run_ranges(p, args)
    check_clip_flag(p, args.clip)
    if args.teacher_clip is not None:
        check_clip_flag(p, args.teacher_clip, "--teacher-clip")
    try:
        check_output_dir(args.output_dir)
        resolve_teacher(args)
    except UserError as e:
        p.error(str(e))


def check_run_ranges(p, args):
    """The ranges of the flags train() reads (recipe filled in)."""
    check_ranges(p, args, {flag: POSITIVE for flag in ("epochs", "batch_size", "eval_batch_size", "n_ctx",
                                                       "cache_size", "topk", "log_interval", "depth")})
    if not 0 <= args.warmup_epochs < args.epochs:
        p.error(f"--warmup-epochs must be in [0, --epochs), got {args.warmup_epochs}")
    # SPEC 4/5: alpha and the cache momentum weigh a convex mix; SGD momentum below 1 converges.
    check_ranges(p, args, dict(
        lr=(lambda v: v > 0 and math.isfinite(v), "a positive number"),
        warmup_lr=NON_NEGATIVE, weight_decay=NON_NEGATIVE, semantic_weight=NON_NEGATIVE, reg_weight=NON_NEGATIVE,
        alpha=UNIT, cache_momentum=UNIT, momentum=(lambda v: 0 <= v < 1, "in [0, 1)"), seed=NON_NEGATIVE,
        workers=NON_NEGATIVE, kd_weight=NON_NEGATIVE, temperature=(lambda v: v > 0 and math.isfinite(v), "positive")))


def check_clip_flag(p, name, flag="--clip"):
    if name not in clip_model.MODELS and not os.path.isfile(name):
        p.error(f"{flag} {name!r}: no such file; expected an official name ({', '.join(clip_model.MODELS)}) "
                f"or a weights file")


def check_prompts(args, classnames, context_length=77):
    """--n-ctx and --ctx-init against CLIP's 77-token context, before CLIP is loaded: the
    longest class prompt "<context> <class name>." must fit with its SOT and EOT tokens."""
    tokens = clip_model.token_count
    prefix = args.ctx_init.replace("_", " ") if args.ctx_init else " ".join(["X"] * args.n_ctx)
    if args.ctx_init and tokens(prefix) != args.n_ctx:
        raise UserError(f"--ctx-init {args.ctx_init!r} is {tokens(prefix)} tokens but --n-ctx is {args.n_ctx}: "
                        f"make them agree, or pass --ctx-init \"\" for random context")
    longest = max(classnames, key=lambda name: tokens(f"{prefix} {name.replace('_', ' ')}."))
    length = tokens(f"{prefix} {longest.replace('_', ' ')}.") + 2
    if length > context_length:
        raise UserError(f"--n-ctx {args.n_ctx}: the prompt of class {longest!r} is {length} tokens, over CLIP's "
                        f"{context_length}; lower --n-ctx")


def load_clip(name, flag="--clip"):
    """clip_model.load_clip with a user error that names the flag (a missing or unreadable file,
    an official name that cannot be downloaded here)."""
    try:
        return clip_model.load_clip(name)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{flag} {name}: {e}") from None


def exit_on_user_error(main):
    """For the command-line mains: a UserError becomes one line on stderr and exit status 2
    (as argparse's own errors); every other exception keeps its traceback."""
    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except UserError as e:
            message = str(e)
            if "Traceback" in message:  # re-raised by a DataLoader worker: its traceback, then the error
                message = message.strip().splitlines()[-1].split(": ", 1)[-1]
            rank = os.environ.get("RANK", "0")
            print(f"error: {message}" if rank == "0" else f"error (rank {rank}): {message}", file=sys.stderr)
            raise SystemExit(2) from None
    return wrapped


# ----------------------------------------------------------------------------- runtime

def default_device(args):
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


class Collective:
    """Which collectives the process is in or about to enter: named when one times out."""
    now = "process-group set-up"


def setup_runtime(args):
    """-> (rank, world_size, device, group). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = default_device(args)
    if not ddp:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # --device cuda:1: also the current device (Triton, streams)
        return 0, 1, device, None
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    # The model's own collectives (BN statistics, cache partials) get a group of their
    # own so they never interleave with DDP's gradient buckets.
    return dist.get_rank(), dist.get_world_size(), device, dist.new_group(timeout=timeout)


def run_and_teardown(fn, args):
    """fn(args), then (also after an error) close the process group setup_runtime opened.
    A collective that timed out (gloo raises it here; NCCL's watchdog aborts the process
    with its own message naming the operation) ends with one line naming rank and collective."""
    try:
        return fn(args)
    except RuntimeError as e:
        if not (dist.is_initialized() and "timed out" in str(e).lower()):
            raise
        raise SystemExit(f"rank {dist.get_rank()}: timed out after {args.dist_timeout:g} s (--dist-timeout) "
                         f"in {Collective.now}: another rank stalled or died ({str(e).splitlines()[0][:200]})") \
            from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def autocast(device, precision):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def default_precision(args, device):
    return args.precision or ("bf16" if device.type == "cuda" else "fp32")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(device):
    """This process's RNG states. Only the generator of the device it computes on is saved
    (not every visible GPU's): a run resumed with fewer visible GPUs can restore it."""
    py = random.getstate()
    npy = np.random.get_state()
    return dict(python=[py[0], list(py[1]), py[2]],
                numpy=[npy[0], torch.from_numpy(npy[1].astype(np.int64)), *npy[2:]],
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], npy[1].numpy().astype(np.uint32), *npy[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def replace_atomically(path, mode, write):
    """write(f) into path + ".tmp", flush it to the disk, then rename over path: a crash
    (or power loss) at any point leaves either the previous file or the complete new one.
    A full or failing disk is a UserError; the temporary file is removed, path left as it was."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if isinstance(e, RuntimeError) and "write" not in str(e):
            raise
        if os.path.lexists(tmp):
            os.remove(tmp)
        kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "nothing was written"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise UserError(f"cannot write {path}: {reason}; {kept}; free space on that disk (then --resume)") from None
    os.replace(tmp, path)


def save_atomic(obj, path):
    replace_atomically(path, "wb", lambda f: torch.save(obj, f))


def remove_leftover_tmp(folder, names):
    """Delete the temporary files an interrupted replace_atomically left for these names."""
    for name in names:
        if os.path.lexists(os.path.join(folder, name + ".tmp")):
            os.remove(os.path.join(folder, name + ".tmp"))


CHECKPOINT_KINDS = "train.py's best.pt or last.pt, or an authors' run folder (holding prompt_learner/ and Memory/)"


def load_checkpoint(path):
    """A checkpoint dict written by train.py; anything else is a UserError saying what it is."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} not found")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a complete checkpoint ({os.path.getsize(path)} bytes, no zip directory: "
                        f"cut short by a crash, a full disk or a copy?); expected {CHECKPOINT_KINDS}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: holds pickled objects, which train.py's checkpoints never do (an authors' "
                        f".pth.tar file?); expected {CHECKPOINT_KINDS}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0][:200]}); "
                        f"expected {CHECKPOINT_KINDS}") from None
    if not (isinstance(ckpt, dict) and {"model", "args", "epoch"} <= ckpt.keys()):
        raise UserError(f"{path}: not a checkpoint of train.py (no 'model', 'args' and 'epoch' entries; "
                        f"a bare state dict?); expected {CHECKPOINT_KINDS}")
    return ckpt


# ----------------------------------------------------------------------------- output-folder lock

LOCK_NAME = ".lock"


def _process_start(pid):
    """Start time of process pid (clock ticks after boot; Linux), None where unknown: with
    the pid it names one process, also after the pid has been reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_namespace():
    """Containers sharing a host name may not share pids; None where unknown."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _lock_is_stale(holder):
    """A lock of this host whose process is gone (or whose pid now runs another process)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False  # another host's process cannot be checked from here
    if holder.get("pidns") != _pid_namespace():
        return False  # nor one in another container's pid namespace
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = _process_start(holder["pid"])
    return None not in (start, holder.get("start")) and start != holder["start"]


def acquire_output_lock(folder):
    """Hold `folder` for a training run: create folder/.lock holding host, pid, process start
    time and date, atomically (a hard link to a complete file: atomic also on NFS and the
    other shared filesystems multi-node runs write to; O_EXCL where links are unsupported).
    An existing lock of this host whose process is gone is stale and taken over (so --resume
    after kill -9 works); a live one, or any lock of another host (whose processes cannot be
    checked from here), is refused with a message saying how to remove it. -> lock path."""
    path = os.path.join(folder, LOCK_NAME)
    me = dict(host=socket.gethostname(), pid=os.getpid(), start=_process_start(os.getpid()),
              pidns=_pid_namespace(), since=time.strftime("%Y-%m-%d %H:%M:%S"))
    mine = f"{path}-{me['host']}-{me['pid']}"  # not *.tmp: the start-up clean-up must leave it alone
    with open(mine, "w") as f:
        json.dump(me, f)
    holder = {}
    try:
        for _ in range(3):
            try:
                try:
                    os.link(mine, path)
                except FileExistsError:
                    raise
                except OSError:  # no hard links on this filesystem
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    with os.fdopen(fd, "w") as f:
                        json.dump(me, f)
                return path
            except FileExistsError:
                try:
                    with open(path) as f:
                        holder = json.load(f)
                except FileNotFoundError:
                    continue  # released meanwhile
                except (OSError, ValueError):
                    holder = {}
                if not (isinstance(holder, dict) and _lock_is_stale(holder)):
                    break
                print(f"removing the stale lock {path} of pid {holder['pid']} (no longer running)")
                os.remove(path)
    finally:
        os.remove(mine)
    who = (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"
           if isinstance(holder, dict) and holder else "an unreadable lock")
    raise UserError(f"--output-dir {folder} is in use by another training run ({who}): wait for it, or choose "
                    f"another --output-dir; if that run is dead (e.g. on another node), delete {path}")


def release_output_lock(path):
    """Remove the lock if it is still this process's."""
    try:
        with open(path) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return
    if (holder.get("host"), holder.get("pid")) == (socket.gethostname(), os.getpid()):
        os.remove(path)


def hold_output_dir(args, rank, world_size):
    """Master: create --output-dir, take its lock, clean leftover *.tmp files. Every rank gets
    the master's verdict, so all stop together on a refusal. -> lock path (master) or None."""
    lock, error = None, None
    if rank == 0:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            lock = acquire_output_lock(args.output_dir)
        except (UserError, OSError) as e:
            error = str(e)
        else:  # the lock is ours: a .tmp here is a write interrupted in an earlier run
            remove_leftover_tmp(args.output_dir, ("last.pt", "best.pt", "log.jsonl", "results.json"))
    if world_size > 1:
        Collective.now = "the broadcast of the output-folder lock"
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error:
        raise UserError(error)
    return lock


class WarmupCosineLR:
    """Per-epoch learning rate of Dassl's ConstantWarmupScheduler around
    CosineAnnealingLR(T_max=epochs): epochs < warmup run at warmup_lr, epoch e >= warmup
    at lr * (1 + cos(pi * (e - warmup) / epochs)) / 2 (SPEC 5)."""

    def __init__(self, optimizer, lr, epochs, warmup_epochs, warmup_lr):
        self.optimizer = optimizer
        self.lr, self.epochs, self.warmup_epochs, self.warmup_lr = lr, epochs, warmup_epochs, warmup_lr
        self.epoch = 0

    def lr_at(self, epoch):
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        return self.lr * (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / self.epochs)) / 2

    def set_epoch(self, epoch):
        self.epoch = epoch
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(epoch)
        return self.lr_at(epoch)

    def state_dict(self):
        return dict(lr=self.lr, epochs=self.epochs, warmup_epochs=self.warmup_epochs,
                    warmup_lr=self.warmup_lr, epoch=self.epoch)

    def load_state_dict(self, state):
        self.lr, self.epochs, self.epoch = state["lr"], state["epochs"], state["epoch"]
        self.warmup_epochs, self.warmup_lr = state["warmup_epochs"], state["warmup_lr"]


# ----------------------------------------------------------------------------- evaluation

def metrics(confusion, classnames):
    """confusion[true, pred] counts -> accuracy, macro-F1, per-class accuracy.
    Macro-F1 averages over the classes that occur as a true label, as Dassl/CoOp's
    f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true)) does; a class only
    ever predicted adds no F1 term of its own (its predictions still count as errors).
    per_class_accuracy is a list in label order, aligned with classnames (names may repeat),
    None for a class without images."""
    cm = confusion.double().cpu()  # (C, C)
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    present = support > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    per_class = [(100 * tp[i] / support[i]).item() if support[i] > 0 else None for i in range(len(classnames))]
    total = int(cm.sum().item())
    return dict(accuracy=100 * tp.sum().item() / max(total, 1),
                macro_f1=100 * f1[present].mean().item() if present.any() else 0.0,
                per_class_accuracy=per_class, classnames=list(classnames), num_images=total,
                num_classes=len(classnames))


def train_step(model, images, labels, optimizer, scaler, device, precision):
    """One optimisation step on a uint8 loader batch (moved to the device and normalised there)
    -> the model's output dict. train() and the benchmark both run this function, so the
    benchmark times training."""
    images = data.normalize(images.to(device, non_blocking=True))
    labels = labels.to(device, non_blocking=True)
    with autocast(device, precision):
        out = model(images, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    return out


@torch.no_grad()
def eval_step(model, images, device, precision, features=None):
    """One uint8 loader batch through a model in eval mode -> (logits (B, C), image features).

    A model with frozen image features (FeatureCache) computes model.logits(model.image_features(x)),
    the same as its forward, and returns the features (B, D) too; given the batch's stored
    features instead of images, it skips the image tower. Other models: (model(x), None).
    evaluate() and the benchmark both run this function."""
    with autocast(device, precision):
        if not getattr(model, "frozen_image_features", False):
            return model(data.normalize(images.to(device, non_blocking=True))), None
        if features is None:
            features = model.image_features(data.normalize(images.to(device, non_blocking=True)))
        return model.logits(features), features


class FeatureCache:
    """Frozen image-tower features of the eval splits, computed once per training run.

    For a model with frozen_image_features (eval logits = model.logits(model.image_features(x)),
    and nothing trained reaches image_features) under the deterministic eval transform, an
    image's features are the same at every evaluation of a run. The first evaluate() over a
    loader stores them batch by batch as computed: the same tensors in the same shapes, so the
    later logits are bitwise those of a pass through the tower; the tower's own output dtype
    (bf16/fp16 under autocast), on the device. Later passes over the same images skip decoding
    and the image tower. Keyed by the rank's shard (image paths), batch size and precision, so
    ImageNet's test pass reuses its val features (they are the same images). Memory: D x 2
    bytes per image under bf16/fp16 autocast, the CUDA default (4 in fp32, as on the CPU);
    ImageNet's 25 000 base val images with ViT-B/16 in bf16: 26 MB over all ranks. Models
    without frozen image features are evaluated without it."""

    def __init__(self):
        self.batches = {}  # key -> [(features (B, D) on the device, labels (B,))]

    @staticmethod
    def key(loader, precision):
        return tuple(item.impath for item in loader.dataset.items), loader.batch_size, precision


@torch.no_grad()
def evaluate(model, loader, classnames, device, precision, feature_cache=None, columns=None):
    """Top-1 metrics of the model's logits over this rank's shard; counts are summed over all
    ranks, so every image of the split counts once. feature_cache: a FeatureCache shared by
    the evaluations of one run (used only for a model with frozen image features). columns:
    the classifier rows of `classnames` when the model classifies more classes
    (RunData.columns), else None."""
    model.eval()
    C = len(classnames)
    rows = None if columns is None else torch.as_tensor(columns, device=device)
    confusion = torch.zeros(C * C, dtype=torch.int64, device=device)
    cached = feature_cache is not None and getattr(model, "frozen_image_features", False)
    key = FeatureCache.key(loader, precision) if cached else None
    stored = feature_cache.batches.get(key) if cached else None
    computed = []
    for inputs, labels in loader if stored is None else stored:
        if stored is None:
            logits, features = eval_step(model, inputs, device, precision)  # (B, C), (B, D)
            if cached:
                computed.append((features, labels))
        else:
            logits, _ = eval_step(model, None, device, precision, features=inputs)
        if rows is not None:
            logits = logits.index_select(1, rows)  # (B, n) -> (B, C)
        idx = labels.to(device, non_blocking=True) * C + logits.argmax(1)
        confusion.index_add_(0, idx, torch.ones_like(idx))
    if cached and stored is None:
        feature_cache.batches[key] = computed
    if dist.is_initialized():
        Collective.now = "the all-reduce of the evaluation counts"
        dist.all_reduce(confusion)
    return metrics(confusion.view(C, C), classnames)


def write_json(obj, path):
    replace_atomically(path, "w", lambda f: json.dump(obj, f, indent=2))


class PhaseTimer:
    """Wall seconds per phase of a run, for --benchmark-run. A phase ends with a CUDA sync, so
    asynchronous GPU work is charged to the phase that queued it. train() gets a disabled
    timer by default: no syncs, no work."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.seconds = collections.defaultdict(float)

    def add(self, phase, seconds):
        self.seconds[phase] += seconds

    def __call__(self, phase):
        return self._timed(phase) if self.enabled else nullcontext()

    @contextmanager
    def _timed(self, phase):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.add(phase, time.perf_counter() - t0)

    def timed(self, iterable, phase):
        """iterable, with the time spent waiting for each item charged to phase."""
        if not self.enabled:
            return iterable
        return self._timed_items(iterable, phase)

    def _timed_items(self, iterable, phase):
        with self(phase):
            iterator = iter(iterable)  # a loader starts its workers here
        while True:
            with self(phase):
                item = next(iterator, StopIteration)
            if item is StopIteration:
                return
            yield item


# ----------------------------------------------------------------------------- benchmark

# README targets: a TextRefiner training step at most 1.10x plain CoOp's; TextRefiner inference
# images/s at least 95% of zero-shot CLIP's.
TRAIN_STEP_TARGET, EVAL_RATE_TARGET = 1.10, 0.95


def benchmark(args, training):
    """Median step time of the --method's models (coop: TextRefiner, plain CoOp and zero-shot
    CLIP; promptkd: PromptKD + TextRefiner, plain PromptKD and the released per-batch teacher
    text, see promptkd_benchmark) on random weights and a synthetic batch (no data or
    checkpoint); training=False times inference.

    Honest by construction: the steps are the functions train() and evaluate() run
    (train_step, eval_step), batches start on the host as loader batches do, the models' steps
    alternate within every round (the order rotating from round to round, so each model takes
    each position equally often) so a busy machine slows all of them alike, and eval-mode models are put in eval mode once, as evaluate() does, so
    their class features are computed once, not per step. -> {name: steps/s (median)}."""
    device = default_device(args)
    precision = default_precision(args, device)
    seed_everything(0)
    config = clip_model.CONFIGS[args.benchmark_clip]
    clip = clip_model.build_model(clip_model.random_state_dict(config)).to(device)
    classnames = [f"class {i}" for i in range(args.num_classes)]
    B, R = args.batch_size, config.image_resolution
    images = torch.randint(256, (B, 3, R, R), dtype=torch.uint8)  # as the loaders deliver them
    labels = torch.randint(args.num_classes, (B,))
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    warmup = args.benchmark_warmup  # kernel compilation, allocator, first class-feature computation
    models, comparisons = METHODS[args.method].benchmark(args, clip, classnames)
    print(f"benchmark: --method {args.method}, {args.benchmark_clip} random weights, batch {B}, "
          f"{args.num_classes} classes, {device}, {precision}, {'training' if training else 'inference'} steps; "
          f"{args.benchmark_steps} rounds after {warmup} warm-up, models alternating in every round")
    steps, kinds = {}, {}
    for name, model in models:
        model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        if training and params:
            model.train()
            optimizer = torch.optim.SGD(params, lr=1e-5, momentum=0.9)
            scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
            steps[name] = lambda m=model, o=optimizer, s=scaler: train_step(m, images, labels, o, s, device, precision)
            kinds[name] = "train"
        else:
            model.eval()
            steps[name] = lambda m=model: eval_step(m, images, device, precision)
            kinds[name] = "eval"
    names = list(steps)
    times = {name: [] for name in names}
    for round_ in range(warmup + args.benchmark_steps):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t0)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    for name in names:
        q1, q3 = 1e3 * np.percentile(times[name], [25, 75])
        print(f"{name:>15s} ({kinds[name]}): {1e3 * medians[name]:9.2f} ms/step median "
              f"(quartiles {q1:.2f}-{q3:.2f}) {B / medians[name]:9.1f} images/s")
    for name, reference, target, measure in comparisons["train" if training else "eval"]:
        if measure == "time":  # step-time ratio, at most the target
            what, sign, ratio = "step time", "<=", medians[name] / medians[reference]
            meets = target is not None and ratio <= target
        else:  # images/s ratio, at least the target
            what, sign, ratio = "images/s", ">=", medians[reference] / medians[name]
            meets = target is not None and ratio >= target
        verdict = "" if target is None else f" ({'meets' if meets else 'MISSES'} the target {sign} {target:.2f})"
        print(f"{name} {what} / {reference} {what}: {ratio:.3f}{verdict}")
    return {name: 1 / m for name, m in medians.items()}


RUN_PHASES = ("start-up", "data loading", "compute", "val", "checkpointing", "test")


def benchmark_run(args):
    """The real train() (base classes, per-epoch val, best-val test, checkpoints) on a synthetic
    dataset of photo-like 500x375 JPEGs and random --benchmark-clip weights, its wall time split
    by PhaseTimer, then the train loader timed alone: loader images/s against model images/s
    shows which one bounds a run on this machine. Every other flag is train.py's (--epochs,
    --batch-size, --workers, --shots, --no-feature-cache, ...). One process. -> {phase: seconds}."""
    if "RANK" in os.environ:
        raise SystemExit("--benchmark-run times one process; run it with python, not torchrun")
    with tempfile.TemporaryDirectory(prefix="textrefiner-run-") as tmp:
        t0 = time.perf_counter()
        root, weights = os.path.join(tmp, "data"), os.path.join(tmp, "clip.pt")
        data.write_synthetic_dataset(root, args.benchmark_layout, num_classes=args.num_classes,
                                     images_per_class=args.benchmark_images, image_size=(500, 375),
                                     natural=True)
        config = clip_model.CONFIGS[args.benchmark_clip]
        torch.save(clip_model.random_state_dict(config), weights)
        written = time.perf_counter() - t0
        # Imports are part of a user's start-up; this process has them already, so time them apart.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import train"], cwd=os.path.dirname(os.path.abspath(__file__)),
                       check=True)
        imports = time.perf_counter() - t0
        run_args = argparse.Namespace(**dict(vars(args), dataset=args.benchmark_layout, root=root, clip=weights,
                                             subsample="base", output_dir=os.path.join(tmp, "run"), resume=False))
        timer = PhaseTimer()
        t0 = time.perf_counter()
        results = run_and_teardown(lambda a: train(a, timer), run_args)
        wall = time.perf_counter() - t0
        splits = data.load_splits(run_args.dataset, root, num_shots=args.shots, seed=args.seed, subsample="base")
        steps_per_epoch = max(1, len(splits["train"]) // args.batch_size)
        train_images = args.epochs * steps_per_epoch * min(args.batch_size, len(splits["train"]))
        loader_rate = data.benchmark(run_args.dataset, root, workers=args.workers, batch_size=args.batch_size,
                                     resolution=config.image_resolution, steps=2 * steps_per_epoch,
                                     num_shots=args.shots)
    seconds = dict(timer.seconds)
    seconds["other (logging, between phases)"] = wall - sum(seconds.values())
    model_rate = train_images / seconds["compute"]
    print(f"\nwhole run: {args.benchmark_layout} layout, base classes of {args.num_classes}, "
          f"{len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test images "
          f"(500x375 JPEGs), {args.benchmark_clip} random weights, {args.epochs} epochs, batch "
          f"{args.batch_size}, {run_args.precision}, {args.workers} workers, feature cache "
          f"{'off' if args.no_feature_cache else 'on'}; dataset written in {written:.1f} s (not counted)")
    print(f"{'phase':<34s}{'seconds':>9s}{'share':>8s}")
    for phase in (*RUN_PHASES, "other (logging, between phases)"):
        print(f"{phase:<34s}{seconds.get(phase, 0.0):9.2f}{seconds.get(phase, 0.0) / wall:8.1%}")
    print(f"{'whole run (train())':<34s}{wall:9.2f}{1:8.1%}")
    print(f"{'python imports (timed apart)':<34s}{imports:9.2f}")
    print(f"training images: {train_images}; loader alone {loader_rate:.1f} images/s (decode + augment, "
          f"{args.workers} workers) vs model {model_rate:.1f} images/s (training steps): the "
          f"{'loader' if loader_rate < model_rate else 'model'} bounds training on this machine")
    print(f"test accuracy {results['accuracy']:.2f} (random weights: only the pipeline is checked)")
    return dict(seconds, wall=wall, imports=imports, loader_images_per_s=loader_rate,
                model_images_per_s=model_rate)


# ----------------------------------------------------------------------------- methods
# A method is a model class with one interface (train forward(images, labels) -> dict with
# "loss" and the other entries of its loss_keys; eval forward -> logits; set_classnames;
# set_process_group; trainable_state_dict / load_trainable_state_dict), one row of recipe
# defaults and its data protocol. train() and eval.py go through METHODS[args.method] only.

@dataclass(frozen=True)
class Recipe:
    """Flag defaults of a method: every flag left at None takes the row's value."""
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    n_ctx: int = 4
    cache_size: int = 25
    alpha: float = 0.2
    cache_momentum: float = 0.8
    topk: int = 5

    def defaults(self, dataset):
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CoOpRecipe(Recipe):
    """SPEC 5: CoOp + TextRefiner, the paper's scripts."""
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.002
    ctx_init: str = "a photo of a"
    semantic_weight: float = 0.02
    reg_weight: float = 20.0


# PromptKD's per-dataset distillation weight (the comment in its scripts; SPEC 11.2); 1000 elsewhere.
KD_WEIGHTS = {"fgvc_aircraft": 200.0, "oxford_flowers": 200.0, "dtd": 200.0}


@dataclass(frozen=True)
class PromptKDRecipe(Recipe):
    """SPEC 11.3: PromptKD + TextRefiner (student ViT-B/16, PromptSRC ViT-L/14 teacher)."""
    epochs: int = 20
    batch_size: int = 8
    lr: float = 0.005
    depth: int = 9  # the student's deep visual prompts; PromptKD's cross-dataset student uses 3
    kd_weight: float = None  # per dataset, see defaults()
    temperature: float = 1.0
    teacher_clip: str = "ViT-L/14"

    def defaults(self, dataset):
        return dict(super().defaults(dataset), kd_weight=KD_WEIGHTS.get(dataset, 1000.0))


@dataclass
class RunData:
    """What a run trains and evaluates on. Labels of `train` index `classnames`, the classes the
    model is built with; labels of `val` and `test` index `eval_classnames`, which are the
    classifier rows `columns` (None: every row, and eval_classnames == classnames).
    select_split: the split that per-epoch model selection evaluates ("val" or "test")."""
    train: list
    classnames: list
    val: list
    test: list
    eval_classnames: list
    columns: list = None
    select_split: str = "val"


def labelled_data(args):
    """CoOp: the labelled --shots picks of the --subsample classes; selection on their val split."""
    s = data.load_splits(args.dataset, args.root, num_shots=args.shots, seed=args.seed, subsample=args.subsample)
    return RunData(s["train"], s["classnames"], s["val"], s["test"], s["classnames"])


def transductive_data(args):
    """PromptKD (SPEC 11.4): the student distils on unlabelled images of ALL classes (the --shots
    picks of load_splits(subsample="all"); the whole train split with --shots 0; a test-only
    dataset's test images, as released). The classifier covers all n classes; --subsample picks
    the rows evaluated (base: the first ceil(n/2), new: the rest; refinement is row-wise).
    Per-epoch selection evaluates those classes' test split, as released."""
    every = data.load_splits(args.dataset, args.root, num_shots=args.shots, seed=args.seed, subsample="all")
    evaluated = data.subsample_classes(every, args.subsample)
    columns = None if args.subsample == "all" else data.subsample_labels(every["train"], args.subsample)
    return RunData(every["train"] or every["test"], every["classnames"], evaluated["val"], evaluated["test"],
                   evaluated["classnames"], columns, select_split="test")


def build_coop(args, classnames, clip=None):
    clip = clip if clip is not None else load_clip(args.clip)
    return TextRefinerCLIP(clip, classnames, n_ctx=args.n_ctx, ctx_init=args.ctx_init,
                           cache_size=args.cache_size, alpha=args.alpha,
                           momentum=args.cache_momentum, topk=args.topk,
                           semantic_weight=args.semantic_weight, reg_weight=args.reg_weight,
                           refiner=not args.no_refiner)


def build_promptkd(args, classnames, clip=None):
    """Student CLIP (--clip) + the frozen PromptSRC teacher read from args.teacher (a file:
    resolve_teacher ran) on the --teacher-clip base weights."""
    clip = clip if clip is not None else load_clip(args.clip)
    teacher_clip = load_clip(args.teacher_clip, flag="--teacher-clip")
    # base/new runs distil from the dataset's base-class teacher (its class prompts are checked
    # against these names); all-class runs are PromptKD's cross-dataset protocol, whose teacher
    # learnt ImageNet's 1000 classes (names not at hand: their count is checked).
    if args.subsample == "all":
        trained_on = dict(num_trained_classes=IMAGENET_CLASSES)
    else:
        trained_on = dict(trained_classnames=classnames[:math.ceil(len(classnames) / 2)])
    try:
        teacher = textrefiner.PromptSRCTeacher.from_checkpoint(teacher_clip, args.teacher, classnames, **trained_on)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"--teacher {args.teacher}: {e}") from None
    return textrefiner.PromptKDCLIP(clip, teacher, classnames, depth=args.depth, n_ctx=args.n_ctx,
                                    kd_weight=args.kd_weight, temperature=args.temperature,
                                    cache_size=args.cache_size, alpha=args.alpha, momentum=args.cache_momentum,
                                    topk=args.topk, refiner=not args.no_refiner)


def check_coop(args, run):
    check_prompts(args, run.classnames)


class TeacherTextPerBatch(torch.nn.Module):
    """--benchmark only: a PromptKDCLIP paying the released trainer's cost, the teacher's class
    text features recomputed for every batch (T-t:488 in training, 608 at test) where the model
    computes them once per class set. (Our text tower still runs the truncated prompts, SPEC 9.3;
    the released one runs all 77 positions, so its real cost is higher still.)"""

    def __init__(self, model):
        super().__init__()
        self.model, self.loss_keys = model, model.loss_keys

    def forward(self, *inputs):
        self.model.teacher._class_features.clear()  # the memos the model keeps, forgotten
        self.model._class_features.clear()
        return self.model(*inputs)


def coop_benchmark(args, clip, classnames):
    """--benchmark models and comparisons (name, reference, target, "time": step-time ratio <=
    target | "rate": images/s ratio >= target; target None: reported only) for training and eval."""
    models = [("TextRefiner", TextRefinerCLIP(clip, classnames)),
              ("CoOp", TextRefinerCLIP(clip, classnames, refiner=False)),
              ("zero-shot CLIP", ZeroShotCLIP(clip, classnames))]
    return models, dict(train=[("TextRefiner", "CoOp", TRAIN_STEP_TARGET, "time")],
                        eval=[("TextRefiner", "zero-shot CLIP", EVAL_RATE_TARGET, "rate")])


def promptkd_benchmark(args, clip, classnames):
    """PromptKD + TextRefiner against plain PromptKD (targets: a training step at most 1.10x,
    evaluation within 5%), and against the released code's per-batch teacher text; a random
    --teacher-clip (ViT-L/14) teacher with the released PromptSRC prompts (4 tokens, depth 9)."""
    config = clip_model.CONFIGS[args.teacher_clip]
    teacher_clip = clip_model.build_model(clip_model.random_state_dict(config, seed=1))
    depth, n_ctx = min(9, config.vision_layers, config.transformer_layers), 4
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(shape, generator=g) * 0.02 for shape in
               ((n_ctx, config.transformer_width), (depth - 1, n_ctx, config.transformer_width),
                (depth, n_ctx, config.vision_width))]

    def student(refiner):  # a teacher object each: the per-batch variant must not clear the others' memo
        teacher = textrefiner.PromptSRCTeacher(teacher_clip, *prompts, classnames)
        return textrefiner.PromptKDCLIP(clip, teacher, classnames, depth=min(args.depth, clip.config.vision_layers),
                                        n_ctx=args.n_ctx, kd_weight=args.kd_weight, refiner=refiner)

    released = "PromptKD+TR (released)"  # the teacher text per batch
    models = [("PromptKD+TextRefiner", student(True)), ("PromptKD", student(False)),
              (released, TeacherTextPerBatch(student(True)))]
    return models, {kind: [("PromptKD+TextRefiner", "PromptKD", target, measure),
                           (released, "PromptKD+TextRefiner", None, measure)]
                    for kind, target, measure in (("train", TRAIN_STEP_TARGET, "time"),
                                                  ("eval", EVAL_RATE_TARGET, "rate"))}


@dataclass(frozen=True)
class Method:
    recipe: Recipe
    build: Callable      # (args, classnames, clip=None) -> model
    data: Callable       # (args) -> RunData
    check: Callable      # (args, RunData): input errors before any weights are loaded, or None
    labelled: bool       # trains on labels (PromptKD distils unlabelled images; its forward ignores them)
    benchmark: Callable  # (args, clip, classnames) -> --benchmark models and comparisons
    teacher: bool = False  # needs --teacher


METHODS = {
    "coop": Method(CoOpRecipe(), build_coop, labelled_data, check_coop, labelled=True, benchmark=coop_benchmark),
    "promptkd": Method(PromptKDRecipe(), build_promptkd, transductive_data, None, labelled=False,
                       benchmark=promptkd_benchmark, teacher=True),
}
RECIPE_FLAGS = sorted({f.name for m in METHODS.values() for f in dataclasses.fields(m.recipe)})


# results.json "selection" -> what it means (also printed at start and by eval.py --report).
SELECTIONS = {"best-val": "the epoch of best val accuracy",
              "best-test": "the epoch of best test accuracy on the evaluated classes, as released; this selects "
                           "on test data",
              "last": "the last epoch"}


def build_model(args, classnames, clip=None):
    """The model of args.method (resolved flags) for `classnames`; clip: the student CLIP, else --clip."""
    return METHODS[args.method].build(args, classnames, clip)


def apply_recipe(p, args):
    """Fill every recipe flag left at None from the --method's row; a flag of another method's
    recipe that was given is a flag error (status 2)."""
    method = METHODS[args.method]
    own = method.recipe.defaults(args.dataset)
    for flag in RECIPE_FLAGS:
        if flag in own:
            if getattr(args, flag) is None:
                setattr(args, flag, own[flag])
        elif getattr(args, flag) is not None:
            p.error(f"--{flag.replace('_', '-')} applies to --method "
                    f"{' or '.join(n for n, m in METHODS.items() if flag in m.recipe.defaults(None))}, "
                    f"not {args.method}")
    if getattr(args, "teacher", None) is not None and not method.teacher:
        p.error(f"--teacher applies to --method promptkd, not {args.method}")


# PromptKD's released teachers (SPEC 11.4): <teachers>/<Name>/VLPromptLearner/model-best.pth.tar,
# Name = the dataset's Dassl name; PromptKD's README also spells two folders differently.
TEACHER_FOLDERS = {"caltech101": ("Caltech101",), "dtd": ("DescribableTextures",), "eurosat": ("EuroSAT",),
                   "fgvc_aircraft": ("FGVCAircraft", "FGVCaircraft"), "food101": ("Food101",),
                   "imagenet": ("ImageNet",), "oxford_flowers": ("OxfordFlowers",), "oxford_pets": ("OxfordPets",),
                   "stanford_cars": ("StanfordCars", "StandfordCars"), "sun397": ("SUN397",), "ucf101": ("UCF101",)}
IMAGENET_CLASSES = 1000
BASE2NEW_TEACHER = os.path.join("VLPromptLearner", "model-best.pth.tar")
CROSS_DATASET_TEACHER = os.path.join("ImageNet-xd", "VLPromptLearner_large", "model.pth.tar-20")


def teacher_file(path, dataset, subsample):
    """--teacher: a teacher file as given, or a folder of PromptKD's released teachers, in which
    base/new runs take the dataset's base-class teacher <Name>/VLPromptLearner/model-best.pth.tar
    and all-class (cross-dataset) runs the ImageNet one, ImageNet-xd/VLPromptLearner_large/model.pth.tar-20."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UserError(f"--teacher {path!r}: no such file or folder; expected a PromptKD teacher file or the "
                        f"folder of PromptKD's released teachers")
    if subsample == "all":
        expected = [os.path.join(path, CROSS_DATASET_TEACHER)]
    elif dataset in TEACHER_FOLDERS:
        expected = [os.path.join(path, name, BASE2NEW_TEACHER) for name in TEACHER_FOLDERS[dataset]]
    else:
        raise UserError(f"--teacher {path}: PromptKD released no base-class teacher for {dataset}; "
                        f"pass a teacher file")
    found = [f for f in expected if os.path.isfile(f)]
    if not found:
        raise MissingData(f"--teacher {path}: no teacher for {dataset} ({subsample} classes): expected "
                          f"{' or '.join(expected)} (PromptKD's released teachers, laid out as in its teacher_model/)")
    return found[0]


def resolve_teacher(args):
    """args.teacher -> the teacher file and args.teacher_sha256 (recorded with the run, checked on
    --resume and by eval.py) for a method with a teacher; None for the others."""
    if not METHODS[args.method].teacher:
        args.teacher_sha256 = None
        return
    if args.teacher is None:
        raise UserError(f"--method {args.method} needs --teacher (a PromptKD teacher file, or the folder of "
                        f"PromptKD's released teachers)")
    args.teacher = teacher_file(args.teacher, args.dataset, args.subsample)
    args.teacher_sha256 = clip_model._sha256(args.teacher)


# ----------------------------------------------------------------------------- training

def gather_rng_states(world_size, device):
    """Every rank's RNG state, in rank order (each rank's data augmentation draws its own)."""
    if world_size == 1:
        return [rng_state(device)]
    states = [None] * world_size
    Collective.now = "the all-gather of the RNG states for the checkpoint"
    dist.all_gather_object(states, rng_state(device))
    return states


def logged_epoch(line):
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError):
        return math.inf  # a line cut short by a crash while appending


def train(args, timer=None):
    """Set up, hold --output-dir for the run's lifetime, fit. timer: a PhaseTimer that
    --benchmark-run passes to split the run's wall time."""
    timer = timer or PhaseTimer(enabled=False)
    t_start = time.perf_counter()
    rank, world_size, device, group = setup_runtime(args)
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world_size} ranks")
    lock = hold_output_dir(args, rank, world_size)
    try:
        return fit(args, rank, world_size, device, group, timer, t_start)
    finally:
        if lock:
            release_output_lock(lock)


def fit(args, rank, world_size, device, group, timer, t_start):
    master = rank == 0
    print0 = print if master else (lambda *a, **k: None)
    args.precision = default_precision(args, device)
    last_path, best_path = (os.path.join(args.output_dir, n) for n in ("last.pt", "best.pt"))
    log_path = os.path.join(args.output_dir, "log.jsonl")
    method = METHODS[args.method]
    ckpt = None
    if os.path.exists(last_path):
        if not args.resume:
            raise SystemExit(f"{last_path} exists: pass --resume to continue that run, "
                             f"or choose another --output-dir")
        ckpt = load_checkpoint(last_path)
        if recorded(ckpt["args"], "method") != args.method:
            raise UserError(f"--resume: {last_path} is a --method {recorded(ckpt['args'], 'method')} run, this "
                            f"command trains --method {args.method}; choose another --output-dir")
        changed = {k: (recorded(ckpt["args"], k), getattr(args, k)) for k in RECIPE_KEYS
                   if recorded(ckpt["args"], k) != getattr(args, k)}
        if changed:
            raise SystemExit(f"--resume: flags differ from the run in {last_path} "
                             f"(checkpoint value, new value): {changed}")

    seed_everything(args.seed)  # same on every rank: identical model initialisation
    run = method.data(args)
    if not run.train:
        raise SystemExit(f"--dataset {args.dataset} has no train split (test-only dataset)")
    if not run.test:
        raise UserError(f"--dataset {args.dataset} ({args.subsample} classes): the test split is empty; "
                        f"the final test would have no image")
    if method.check:
        method.check(args, run)
    model = build_model(args, run.classnames).to(device)
    resolution = model.clip.config.image_resolution
    raw_model = model
    if world_size > 1:
        model.set_process_group(group)
        Collective.now = "DDP's set-up (the parameter and buffer broadcast from rank 0)"
        # No buffer broadcast per forward: BN running stats and the cache are kept equal
        # by the model's own reductions (they are synced once at construction).
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    **{DDP_NO_BUFFER_SYNC: False})
    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = WarmupCosineLR(optimizer, args.lr, args.epochs, args.warmup_epochs, args.warmup_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    pin = device.type == "cuda"  # pinning on a CPU run would only create a CUDA context
    train_loader = data.build_train_loader(run.train, args.batch_size, resolution, args.seed,
                                           rank=rank, world_size=world_size, workers=args.workers,
                                           pin_memory=pin)

    def eval_loader(split):
        return data.build_eval_loader(getattr(run, split), args.eval_batch_size, resolution, rank=rank,
                                      world_size=world_size, workers=args.workers, pin_memory=pin)

    use_val = bool(getattr(run, run.select_split)) and args.selection == "best"
    val_loader = eval_loader(run.select_split) if use_val else None
    feature_cache = None if args.no_feature_cache else FeatureCache()

    start_epoch, best = 0, dict(val_acc=-1.0, epoch=-1)
    best_state = None
    if ckpt is not None:
        raw_model.load_trainable_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"][rank if len(ckpt["rng"]) == world_size else 0], device)
        # The best model comes from last.pt itself, never from best.pt: a crash between
        # the two writes leaves a best.pt of another epoch than ckpt["best"] names.
        start_epoch, best, best_state = ckpt["epoch"] + 1, ckpt["best"], ckpt["best_model"]
        if master:  # log.jsonl ends with the checkpoint's epoch, whatever happened after it
            lines = open(log_path).read().splitlines() if os.path.exists(log_path) else []
            kept = [l for l in lines if logged_epoch(l) < ckpt["epoch"]]
            replace_atomically(log_path, "w", lambda f: f.writelines(
                l + "\n" for l in kept + [json.dumps(ckpt["log"])]))
        print0(f"resumed from {last_path} after epoch {ckpt['epoch']}")
        del ckpt
    elif master and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run owns its log

    steps = len(train_loader)
    selection = f"best-{run.select_split}" if use_val else "last"
    print0(f"{args.method} on {args.dataset}: {len(run.classnames)} classes, {len(run.train)} train images; "
           f"{args.subsample} classes evaluated ({len(run.eval_classnames)}): {len(run.val)} val, {len(run.test)} "
           f"test images; {steps} steps/epoch; {world_size} rank(s) on {device}, {args.precision}; model "
           f"selection: {SELECTIONS[selection]}")
    t_run, done = time.perf_counter(), 0
    timer.add("start-up", t_run - t_start)
    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.perf_counter()
        lr = scheduler.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        model.train()
        sums = torch.zeros(len(raw_model.loss_keys), dtype=torch.float64, device=device)
        for step, (images, labels) in enumerate(timer.timed(train_loader, "data loading")):
            Collective.now = f"epoch {epoch + 1} step {step + 1} (gradient, BatchNorm, cache or loss all-reduce)"
            with timer("compute"):
                out = train_step(model, images, labels, optimizer, scaler, device, args.precision)
            sums += torch.stack([out[k].detach().double() for k in raw_model.loss_keys])
            done += 1
            if (step + 1) % args.log_interval == 0 or step + 1 == steps:
                # Reduced over ranks, so every rank sees a non-finite loss at the same step.
                mean = sums.clone()
                if world_size > 1:
                    dist.all_reduce(mean)
                mean = (mean / ((step + 1) * world_size)).tolist()
                if not all(map(math.isfinite, mean)):
                    kept = f"the last good checkpoint is {last_path}" if os.path.exists(last_path) \
                        else "no checkpoint was written"
                    raise SystemExit(f"non-finite loss {mean[0]} at epoch {epoch + 1} step {step + 1}: "
                                     f"stopping; {kept} (try a lower --lr or --precision fp32)")
                rate = done / (time.perf_counter() - t_run)
                eta = ((args.epochs - epoch) * steps - step - 1) / rate
                print0(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps} loss {mean[0]:.4f} "
                       f"lr {lr:.3e} {rate:.2f} it/s eta {eta / 60:.1f} min")
        record = dict(epoch=epoch, lr=lr, **dict(zip(raw_model.loss_keys, mean)))
        if use_val:
            with timer("val"):
                record["val_acc"] = evaluate(raw_model, val_loader, run.eval_classnames, device, args.precision,
                                             feature_cache, run.columns)["accuracy"]
            if record["val_acc"] > best["val_acc"]:
                best = dict(val_acc=record["val_acc"], epoch=epoch)
                best_state = {k: v.detach().clone() for k, v in raw_model.trainable_state_dict().items()}
        record["seconds"] = time.perf_counter() - t_epoch
        ckpt = dict(model=raw_model.trainable_state_dict(), optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), epoch=epoch,
                    args=vars(args), selection=selection, rng=gather_rng_states(world_size, device), best=best,
                    best_model=best_state, log=record)
        with timer("checkpointing"):
            if master:
                # best.pt first: last.pt is what --resume trusts, so it is written last, once
                # everything of this epoch is on disk.
                if best["epoch"] == epoch:
                    save_atomic(ckpt, best_path)
                save_atomic(ckpt, last_path)
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        print0(json.dumps(record))
        del ckpt

    # Final test: the selected model (the last epoch with --selection last or without a selection split).
    if best_state is not None:
        raw_model.load_trainable_state_dict(best_state)
    with timer("test"):
        results = evaluate(raw_model, eval_loader("test"), run.eval_classnames, device, args.precision,
                           feature_cache, run.columns)
    results.update(split="test", dataset=args.dataset, subsample=args.subsample, method=args.method,
                   train_classes=len(run.classnames), train_images=len(run.train),
                   selection=selection, teacher=args.teacher, teacher_sha256=args.teacher_sha256,
                   checkpoint=best_path if best_state is not None else last_path,
                   epoch=best["epoch"] if best_state is not None else args.epochs - 1, args=vars(args))
    if master:
        write_json(results, os.path.join(args.output_dir, "results.json"))
    print0(f"test ({args.subsample}): accuracy {results['accuracy']:.2f} macro-F1 {results['macro_f1']:.2f} "
           f"on {results['num_images']} images")
    return results


@exit_on_user_error
def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    if args.benchmark:
        args.num_classes = args.num_classes or 100
        return benchmark(args, training=True)
    if args.benchmark_run:
        args.num_classes = args.num_classes or 20
        return benchmark_run(args)
    return run_and_teardown(train, args)


if __name__ == "__main__":
    main()
