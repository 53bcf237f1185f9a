"""Evaluate a checkpoint (any --method; the checkpoint says which), zero-shot CLIP, or an authors' run
folder; and report finished runs as the papers' tables, next to the published numbers.

    python eval.py --checkpoint output/coop/base2new/dtd/seed1/base/best.pt --subsample new \
        --output-dir output/coop/base2new/dtd/seed1/new                     # base2new: the new classes
    python eval.py --checkpoint output/coop/xd/imagenet/seed1/last.pt --dataset imagenet_a --root /data \
        --output-dir output/coop/xd/imagenet_a/seed1                        # another dataset
    torchrun --standalone --nproc_per_node=4 eval.py --checkpoint ...      # sharded: every image once
    python eval.py --checkpoint their_run/ --dataset dtd --root /data --subsample new   # the authors' folders
    python eval.py --zeroshot --dataset dtd --root /data --subsample new    # CoOp's hand-crafted prompts
    python eval.py --report output/coop/base2new                            # mean±std over seeds, HM

--dataset, --root, --clip, --shots, --seed, --precision and the method's inputs (PromptKD's --teacher,
--teacher-clip) default to the checkpoint's run; another input file than the run's (by SHA-256) is
refused unless --allow-other-<input>. --subsample defaults to the run's on the same dataset, else all.
results.json holds accuracy, macro_f1, per_class_accuracy (aligned with classnames), num_images,
num_classes, split, method, selection and the arguments as resolved; an existing results.json of
another evaluation in --output-dir is never replaced.
"""
import argparse
import contextlib
import io
import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from queue import Empty

import numpy as np
import torch

import clip_model
import data
import released
import textrefiner
import train
from data import UserError
from textrefiner import METHODS, POSITIVE, RecipeError, ZeroShotCLIP, ZeroShotRecipe


def get_parser():
    p = argparse.ArgumentParser(description="Evaluate a checkpoint or zero-shot CLIP, or report finished runs.")
    p.add_argument("--checkpoint", help="train.py's best.pt/last.pt, or an authors' run folder")
    p.add_argument("--epoch", type=train.ranged(int, POSITIVE),
                   help="authors' folder: load model.pth.tar-EPOCH (default: model-best)")
    p.add_argument("--zeroshot", action="store_true", help="zero-shot CLIP instead of a checkpoint")
    p.add_argument("--method", help="refuse a checkpoint of another method")
    inputs = {name for Model in METHODS.values() for name in Model.recipe.weight_files}
    for name in sorted(inputs):
        flag = name.replace("_", "-")
        p.add_argument(f"--{flag}", help="default: the run's")
        p.add_argument(f"--allow-other-{flag}", action="store_true",
                       help=f"evaluate with another --{flag} file than the one the run recorded")
    p.add_argument("--dataset", help=f"one of {', '.join(data.DATASETS)}")
    p.add_argument("--root", help="data root")
    p.add_argument("--subsample", choices=data.SUBSAMPLES)
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--clip", help="CLIP name or weights file (default: the checkpoint's, else ViT-B/16)")
    p.add_argument("--shots", type=int, help="few-shot split that defines base/new (default: checkpoint's)")
    p.add_argument("--seed", type=train.ranged(int, train.SEEDS))
    p.add_argument("--batch-size", type=train.ranged(int, POSITIVE), default=100, help="per rank")
    p.add_argument("--output-dir", help="write results.json here")
    p.add_argument("--report", metavar="DIR", help="summarise <runs>/base2new or <runs>/xd and exit")
    t = p.add_argument_group("tables: every job of a protocol, resumable, over the GPUs (also --method, --root, --clip, "
                             "--device, the method's inputs)")
    t.add_argument("--table", choices=("base2new", "xd"), help="run the table's jobs not yet finished, then report")
    t.add_argument("--runs", default="output/coop", help="the method's runs: <runs>/<protocol>/<dataset>/seed<S>")
    t.add_argument("--datasets", nargs="+", help="default: the 11 datasets (base2new) or the 14 xd targets")
    t.add_argument("--seeds", nargs="+", type=train.ranged(int, train.SEEDS), default=[1, 2, 3])
    t.add_argument("--no-refiner", action="store_true", help="the method without TextRefiner")
    t.add_argument("--gpus", type=train.ranged(int, textrefiner.NON_NEGATIVE), help="GPUs to use (default: every visible one; with --device cpu: CPU slots)")
    t.add_argument("--jobs-per-gpu", type=train.ranged(int, POSITIVE), default=1, help="jobs running at once on one GPU")
    t.add_argument("--train-args", default="", help="more train.py flags, as one string")
    t.add_argument("--eval-args", default="", help="more eval.py flags, as one string")
    t.add_argument("--launcher", help="run every step as a command with this prefix instead of in this process "
                                      "(make base2new GPUS=4: torchrun)")
    t.add_argument("--list-jobs", action="store_true", help="print the jobs, one per line with its index, and exit")
    t.add_argument("--job", type=int, help="run only the job of this index (a SLURM array task)")
    train.add_run_flags(p)
    return p


def check_args(p, args):
    """Flag errors argparse cannot see; p.error exits with status 2 and the usage line."""
    if args.zeroshot == bool(args.checkpoint):
        p.error("give exactly one of --checkpoint PATH and --zeroshot")
    if args.checkpoint and not os.path.exists(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint!r} does not exist")
    if args.epoch is not None and not (args.checkpoint and os.path.isdir(args.checkpoint)):
        p.error("--epoch N picks model.pth.tar-N in an authors' run folder; a train.py checkpoint is one epoch "
                "(best.pt: best val, last.pt: last epoch)")
    if args.clip:
        train.check_weights_flag(p, args.clip)
    if args.output_dir:
        try:
            data.check_output_dir(args.output_dir)
        except UserError as e:
            p.error(str(e))

# ----------------------------------------------------------------------------- evaluation


def read_checkpoint(args):
    """-> (trainable state dict, the run's flags as a dict (method and selection included), the CLIP
    weights an authors' folder stores (None for train.py's checkpoints, which hold no CLIP))."""
    if os.path.isdir(args.checkpoint):
        ours = [n for n in ("best.pt", "last.pt") if os.path.isfile(os.path.join(args.checkpoint, n))]
        if ours and released.authors_method(args.checkpoint) is None:
            raise UserError(f"--checkpoint {args.checkpoint} is a train.py output folder: pass the file, "
                            f"{os.path.join(args.checkpoint, ours[0])}")
        state, info = released.load_authors_run(args.checkpoint, args.epoch)
        run = {**info["flags"], "method": info["method"], "dataset": None, "root": None, "shots": 16, "seed": 1,
               "subsample": "all", "precision": info["precision"], "refiner": True,
               "clip": info["clip"] or "ViT-B/16", "selected": None}
        return state, run, info["clip_weights"]
    ckpt = data.load_checkpoint(args.checkpoint)
    run = dict(train.recorded_flags(ckpt["args"]), selected=ckpt.get("selection"))  # e.g. "best-test"
    return ckpt["model"], run, None


def check_flags_fit(args, run):
    """--method and the input flags must be the checkpoint's method's: name what the checkpoint is."""
    if args.method and args.method != run["method"]:
        raise UserError(f"--method {args.method}: {args.checkpoint} is a --method {run['method']} checkpoint")
    own = train.load_method(run["method"], run.get("method_file")).recipe.weight_files
    for name in {n for Model in METHODS.values() for n in Model.recipe.weight_files} - set(own):
        flag = name.replace("_", "-")
        for given in (f"--{flag}", f"--allow-other-{flag}"):
            if getattr(args, given[2:].replace("-", "_")):
                raise UserError(f"{given}: {args.checkpoint} is a --method {run['method']} checkpoint, which has no "
                                f"{flag} (a checkpoint of --method "
                                f"{' or '.join(m for m, M in METHODS.items() if name in M.recipe.weight_files)} takes {given})")


def resolve_inputs(args, run, Method, classnames):
    """The inputs the model is built from (a PromptKD student's teacher): the flags, else the run's,
    resolved by the method (a teacher folder to its file); a file that is not the run's (SHA-256) is
    refused unless --allow-other-<input>."""
    recorded = {name: run.get(name) for name in Method.recipe.weight_files}
    for name in Method.recipe.weight_files:
        given = getattr(args, name)
        if given is None and recorded[name] is None and Method.recipe.__dataclass_fields__[name].metadata.get("required"):
            raise UserError(f"--{name.replace('_', '-')} is required: {args.checkpoint} names none (an authors' run "
                            f"folder does not record it; pass the one it was trained with)")
        run[name] = given or recorded[name]
        if run[name] is not None and run[name] not in clip_model.MODELS and not os.path.exists(run[name]):
            raise UserError(f"--{name.replace('_', '-')} {run[name]!r}: no such file or folder"
                            + ("" if given else f" (the one {args.checkpoint} was trained with; pass --{name})"))
    recorded_sha = {name: run.get(name + "_sha256") for name in Method.recipe.weight_files}
    namespace = argparse.Namespace(**run)
    recipe = train.prepare_recipe(Method, namespace, classnames)
    for name in Method.recipe.weight_files:
        ours, theirs = getattr(namespace, name + "_sha256"), recorded_sha[name]
        if None not in (ours, theirs) and ours != theirs and not getattr(args, "allow_other_" + name):
            flag = name.replace("_", "-")
            raise UserError(f"--{flag} {getattr(namespace, name)}: not the {flag} {args.checkpoint} was trained with "
                            f"({recorded[name]}, SHA-256 {theirs[:16]}..., this file {ours[:16]}...); pass that file, "
                            f"or --allow-other-{flag} to evaluate with this one anyway")
    return vars(namespace), recipe


def eval_precision(args, run, device):
    """--precision, else on CUDA the precision the checkpoint was trained in (a model trained in fp32
    is tested in fp32, not in the bf16 default); the CPU computes in fp32."""
    if args.precision is None and device.type == "cuda" and run["precision"]:
        return run["precision"]
    return args.precision or ("bf16" if device.type == "cuda" else "fp32")


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
    if isinstance(found["checkpoint"], str) and found["checkpoint"] != "zero-shot CLIP":
        found["checkpoint"] = os.path.realpath(found["checkpoint"])  # recorded absolute
    differ = {k: f"{found[k]} here, {v} now" for k, v in expected.items() if found[k] != v}
    if differ:
        raise UserError(f"{path} holds the results of another evaluation ({differ}); choose another "
                        f"--output-dir, or delete it")


def evaluate(args):
    """The evaluation args describe; with --output-dir, under that folder's lock (a training or another
    evaluation into it meanwhile is refused, so no result is lost between the check and the write)."""
    rank, world_size, device, _ = train.setup_runtime(args)
    lock = train.on_rank0(lambda: data.acquire_output_lock(args.output_dir), rank, world_size,
                          "the broadcast of the output-folder lock") if args.output_dir else None
    try:
        return _evaluate(args, rank, world_size, device)
    finally:
        if lock:
            data.release_output_lock(lock)


def _evaluate(args, rank, world_size, device):
    if args.zeroshot:
        state, run, stored_clip = None, dict(method=None, dataset=None, root=None,
                                             shots=16, seed=1, subsample="all", clip="ViT-B/16", precision=None,
                                             selected=None), None
    else:
        state, run, stored_clip = read_checkpoint(args)
        check_flags_fit(args, run)
    Method = ZeroShotCLIP if args.zeroshot else train.load_method(run["method"], run.get("method_file"))
    precision = eval_precision(args, run, device)
    dataset, root = args.dataset or run["dataset"], args.root or run["root"]
    source = "zero-shot CLIP has no run to take it from" if args.zeroshot else f"{args.checkpoint} does not name one"
    for flag, value in (("--dataset", dataset), ("--root", root)):
        if value is None:
            raise UserError(f"{flag} is required: {source}")
    if dataset not in data.DATASETS:
        raise UserError(f"--dataset {dataset!r}: expected one of {', '.join(data.DATASETS)}")
    if not os.path.isdir(root):
        raise UserError(f"--root {root!r} is not a directory")
    subsample = args.subsample or (run["subsample"] if dataset == run["dataset"] else "all")
    if not args.zeroshot and not Method.transductive and dataset == run["dataset"] and run["subsample"] == "all" \
            and subsample == "new":
        raise UserError(f"--subsample new: {args.checkpoint} was trained on all classes of {dataset} (subsample: "
                        f"all), so its 'new' classes are training classes; use --subsample all")
    checkpoint = "zero-shot CLIP" if args.zeroshot else os.path.realpath(args.checkpoint)
    if args.output_dir:
        check_results_target(os.path.join(args.output_dir, "results.json"), dict(
            dataset=dataset, subsample=subsample, split=args.split, checkpoint=checkpoint))
    shots = run["shots"] if args.shots is None else args.shots
    seed = run["seed"] if args.seed is None else args.seed
    # The run's own classes (its teacher's): its subsample on its dataset; on another dataset, those evaluated.
    run.update(dataset=dataset, root=root, shots=shots, seed=seed,
               subsample=run["subsample"] if dataset == run["dataset"] else subsample)
    splits = data.run_splits(dataset, root, shots, seed, subsample, Method.transductive and not args.zeroshot)
    classnames, items = splits.eval_classnames, getattr(splits, args.split)
    if not items:
        raise UserError(f"{dataset}: the {args.split} split is empty")
    if args.zeroshot:
        try:
            recipe = ZeroShotRecipe().for_run(dataset, subsample, classnames)
        except RecipeError as e:
            raise UserError(f"--zeroshot: {e.problem} (--dataset {dataset})") from None
    else:
        run, recipe = resolve_inputs(args, run, Method, splits.all_classnames)
    clip_name = args.clip or run["clip"]
    clip = train.load_clip(clip_name)
    if stored_clip:
        released.check_authors_clip(clip, stored_clip, clip_name, args.checkpoint)
    if args.zeroshot:
        model = ZeroShotCLIP(clip, classnames, recipe)
    else:
        model = train.build_model(Method, clip, splits.classnames, recipe)
        try:
            model.load_trainable_state_dict(state)
        except ValueError as e:
            raise UserError(f"{args.checkpoint}: its tensors do not fit a --method {run['method']} model with its "
                            f"recorded flags ({e})") from None
    model.to(device)
    loader = data.build_eval_loader(items, args.batch_size, clip.config.image_resolution, rank=rank,
                                    world_size=world_size, workers=args.workers, pin_memory=device.type == "cuda")
    results = train.evaluate(model, loader, classnames, device, precision,
                             columns=None if args.zeroshot else splits.columns)
    inputs = {k: run.get(k) for name in Method.recipe.weight_files for k in (name, name + "_sha256")}
    resolved = dict(dataset=dataset, root=root, subsample=subsample, shots=shots, seed=seed, clip=clip_name,
                    precision=precision, method=run["method"], **inputs)
    results.update(split=args.split, dataset=dataset, subsample=subsample, checkpoint=checkpoint,
                   checkpoint_sha256=clip_model.sha256(checkpoint) if os.path.isfile(checkpoint) else None,
                   method=None if args.zeroshot else run["method"],
                   refiner=None if args.zeroshot else bool(run.get("refiner", False)),
                   selection=None if args.zeroshot else run["selected"], **inputs, args=dict(vars(args), **resolved))
    if rank == 0:
        print(f"{dataset} {subsample} {args.split}: accuracy {results['accuracy']:.2f} macro-F1 "
              f"{results['macro_f1']:.2f} on {results['num_images']} images, {len(classnames)} classes")
        if args.output_dir:
            try:
                data.write_json(results, os.path.join(args.output_dir, "results.json"))
            except UserError as e:  # a full disk: the evaluation is not lost with the file
                print(json.dumps(results, indent=2))
                raise UserError(f"{e}; the results are on stdout above") from None
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


def read_result(path, dataset, subsample, seed, problems):
    """A results.json, once it is checked to be the test of `dataset` on `subsample` classes with the
    seed its folder says and an accuracy in [0, 100]; None (and a line in problems) otherwise."""
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        problems.append(f"{path}: unreadable ({e}); re-run that step or move its folder out")
        return None
    if not isinstance(result, dict):
        problems.append(f"{path}: not a results.json (a JSON object); re-run that step or move its folder out")
        return None
    accuracy, recorded_seed = result.get("accuracy"), (result.get("args") or {}).get("seed", seed)
    expected = dict(dataset=dataset, subsample=subsample, split="test")
    wrong = {k: result.get(k) for k, v in expected.items() if result.get(k) != v}
    if wrong:
        problems.append(f"{path}: holds {wrong}, but its folder is for {expected}; move the file to its "
                        f"place or re-run that step")
    elif type(accuracy) not in (int, float) or not 0 <= accuracy <= 100 or (
            type(n := result.get("num_images")) is int and n > 0 and abs(accuracy * n / 100 - round(accuracy * n / 100)) > 1e-6):
        of = f" of its {result['num_images']} images" if "num_images" in result else ""
        problems.append(f"{path}: accuracy is {accuracy!r}, expected a number: a percentage in [0, 100]{of}; "
                        f"re-run that step")
    elif recorded_seed != seed:
        problems.append(f"{path}: a run of seed {recorded_seed} in the folder of seed {seed}; move it to its place")
    else:
        result.setdefault("method", "coop")
        result.setdefault("refiner", not (result.get("args") or {}).get("no_refiner", False))
        return result
    return None


def same_model(base, new):
    """What differs between the model base/ tested and the one new/ was evaluated from, or None."""
    for key in ("method", "refiner", "checkpoint_sha256"):
        if None not in (base.get(key), new.get(key)) and base[key] != new[key]:
            return key
    return None


def collect_base2new(root, problems, seen):
    """{dataset: {seed: (base acc, new acc)}} from <root>/<dataset>/seed<S>/{base,new}/results.json,
    each new/ checked to be evaluated from the model its base/ tested. seen: {(method, refiner,
    selection): first path}."""
    runs = {}
    for dataset in dataset_dirs(root):
        for seed, d in seed_dirs(os.path.join(root, dataset), problems):
            paths = [os.path.join(d, part, "results.json") for part in ("base", "new")]
            if all(map(os.path.isfile, paths)):
                base, new = (read_result(p, dataset, part, seed, problems) for p, part in zip(paths, ("base", "new")))
                if base and new and same_model(base, new):
                    problems.append(f"{paths[1]}: evaluated from another model than {paths[0]} tested (its "
                                    f"{same_model(base, new)} differs); re-run make base2new (it re-evaluates "
                                    f"new/) or move the folder out")
                elif base and new:
                    seen.setdefault((base["method"], base["refiner"], base.get("selection")), paths[0])
                    runs.setdefault(dataset, {})[seed] = (base["accuracy"], new["accuracy"])
            elif os.path.isdir(os.path.join(d, "base")):
                print(f"note: {d} is unfinished (no {' and no '.join(p for p in paths if not os.path.isfile(p))}); "
                      f"left out", file=sys.stderr)
    return runs


def collect_xd(root, problems, seen):
    """{target: {seed: accuracy}} from <root>/<target>/seed<S>/results.json."""
    runs = {}
    for target in dataset_dirs(root):
        for seed, d in seed_dirs(os.path.join(root, target), problems):
            path = os.path.join(d, "results.json")
            if os.path.isfile(path) and (result := read_result(path, target, "all", seed, problems)):
                seen.setdefault((result["method"], result["refiner"], result.get("selection")), path)
                runs.setdefault(target, {})[seed] = result["accuracy"]
    return runs


def summarise_base2new(runs):
    """Per dataset: mean and std (population, as CoOp's parse_test_res) over seeds of base and new
    accuracy, and HM of the means; the average row is the mean over the paper's datasets present, HM
    of those means (how the paper's tables compute it)."""
    rows = {}
    for dataset, seeds in runs.items():
        acc = np.array(list(seeds.values()))  # (S, 2)
        base, new = acc.mean(0)
        rows[dataset] = dict(seeds=sorted(seeds), base=base, new=new, hm=harmonic_mean(base, new),
                             base_std=acc[:, 0].std(), new_std=acc[:, 1].std())
    paper = [d for d in data.PAPER_DATASETS if d in rows]
    average = None
    if paper:
        base, new = float(np.mean([rows[d]["base"] for d in paper])), float(np.mean([rows[d]["new"] for d in paper]))
        average = dict(datasets=paper, base=base, new=new, hm=harmonic_mean(base, new))
    return dict(datasets=rows, average=average)


# Report cells: a mean right-aligned in MEAN_W characters, then "±std" in STD_W + 1 (blank when there is
# no std); column headings are right-aligned over the means with the same widths.
MEAN_W, STD_W, GAP = 8, 5, "  "


def value_cell(mean, std=None, with_std=True):
    spread = "" if not with_std else f"±{std:<{STD_W}.2f}" if std is not None else " " * (STD_W + 1)
    return f"{mean:>{MEAN_W}.2f}" + spread


def heading_cell(name, with_std=True):
    return f"{name:>{MEAN_W}}" + (" " * (STD_W + 1) if with_std else "")


def format_table(rows):
    """rows: [label, seeds, *cells], the heading row first; the two text columns as wide as their longest entry."""
    label_w, seeds_w = (max(len(r[i]) for r in rows) for i in (0, 1))
    return [GAP.join([r[0].ljust(label_w), r[1].ljust(seeds_w), *r[2:]]).rstrip() for r in rows]


def published_cells(numbers):
    """Cells of a published (base, new, HM) row; blanks where there is none."""
    if numbers is None:
        return [" " * MEAN_W] * 3
    return [value_cell(v, with_std=False) for v in numbers]


def published_average(published, datasets):
    """(base, new, HM) of published per-dataset numbers averaged over `datasets`, as our average row is."""
    base = float(np.mean([published[d][0] for d in datasets]))
    new = float(np.mean([published[d][1] for d in datasets]))
    return base, new, harmonic_mean(base, new)


def format_base2new(summary, title, published):
    """The paper's table; a method's published per-dataset numbers sit beside ours."""
    rows, average = summary["datasets"], summary["average"]
    tag, beside = published.get("base2new_datasets", (None, None))
    table = [["Dataset", "Seeds", heading_cell("Base"), heading_cell("New"), heading_cell("HM", with_std=False)]
             + ([heading_cell(f"{tag} {h}", False) for h in ("Base", "New", "HM")] if beside else [])]
    if average:
        n = len(data.PAPER_DATASETS)
        label = "Average" if len(average["datasets"]) == n else f"Average ({len(average['datasets'])}/{n})"
        table.append([label, "", value_cell(average["base"]), value_cell(average["new"]),
                      value_cell(average["hm"], with_std=False)]
                     + (published_cells(published_average(beside, average["datasets"])) if beside else []))
    ordered = [d for d in data.PAPER_DATASETS if d in rows] + sorted(d for d in rows if d not in data.PAPER_DATASETS)
    for d in ordered:
        r = rows[d]
        table.append([data.DATASETS[d].paper_name or d, ",".join(map(str, r["seeds"])),
                      value_cell(r["base"], r["base_std"]), value_cell(r["new"], r["new_std"]),
                      value_cell(r["hm"], with_std=False)] + (published_cells(beside.get(d)) if beside else []))
    averages = [[name, "", value_cell(b), value_cell(n), value_cell(h, with_std=False)]
                for name, (b, n, h) in published.get("base2new", {}).items()]
    lines = format_table(table + averages)
    note = [published["note"]] if averages else []
    return "\n".join([title, *lines[:len(table)], *note, *lines[len(table):]])


def report(root):
    """Print and write <root>/report.json: base2new layout when the runs have base/ and new/, else one
    accuracy per dataset (xd). Every results.json is checked first (readable, a number for accuracy,
    the dataset/subsample/split its folder says; no stray folders; one method): each problem is
    printed on its own line and no report is made."""
    if not os.path.isdir(root):
        raise UserError(f"--report {root!r} is not a directory")
    problems, seen = [], {}
    runs = collect_base2new(root, problems, seen)
    xd = {} if runs or problems else collect_xd(root, problems, seen)
    models = sorted({(method, refiner) for method, refiner, _ in seen}, key=str)
    if len(models) > 1:
        mixed = ", ".join(f"{m}{'' if refiner else ' without TextRefiner'}: {p}"
                          for (m, refiner, _), p in sorted(seen.items(), key=str))
        problems.append(f"{root} mixes methods ({mixed}); one table per method: move one method's runs elsewhere")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        raise UserError(f"--report {root}: {len(problems)} problem(s) above; no report made")
    method, refiner = models[0] if models else ("coop", True)
    Method = METHODS.get(method)
    name = (Method.title or Method.__name__) if Method else method
    title = f"{name} + TextRefiner" if refiner else name
    published = getattr(Method, "published", {})
    selections = sorted({s for *_, s in seen if s})
    selection = "Model selection: " + ("; ".join(f"{s} ({train.SELECTIONS.get(s, s)})" for s in selections)
                                       if selections else "not recorded")
    if runs:
        summary = dict(summarise_base2new(runs), method=method, refiner=refiner, selection=selections)
        text = format_base2new(summary, f"{title}: base-to-new generalisation in {root} (mean±std over seeds; HM "
                                        f"of the mean base and new)\n{selection}", published)
    else:
        if not xd:
            raise UserError(f"--report {root}: no finished runs (<dataset>/seed<S>/results.json)")
        known = ["imagenet"] + [d for d, info in data.DATASETS.items() if info.test_only] + data.PAPER_DATASETS[1:]
        order = [t for t in known if t in xd] + sorted(t for t in xd if t not in known)
        summary = {t: dict(seeds=sorted(xd[t]), accuracy=float(np.mean(list(xd[t].values()))),
                           std=float(np.std(list(xd[t].values())))) for t in order}
        tag, beside = published.get("xd", (None, None))
        table = [["Dataset", "Seeds", heading_cell("Accuracy")] + ([heading_cell(tag, False)] if beside else [])]
        for t, r in summary.items():
            table.append([t, ",".join(map(str, r["seeds"])), value_cell(r["accuracy"], r["std"])]
                         + ([value_cell(beside[t], with_std=False) if t in beside else " " * MEAN_W] if beside else []))
        note = [published["xd_note"]] if beside else []
        text = "\n".join([f"{title}: accuracy in {root} (mean±std over seeds)\n{selection}", *format_table(table),
                          *note])
    print(text)
    path = os.path.join(root, "report.json")
    if not os.path.exists(path) or open(path).read() != json.dumps(summary, indent=2):  # a re-run changes no file
        data.write_json(summary, path, shared=True)  # runs of one table may report at once
    return summary


# ----------------------------------------------------------------------------- tables

# Approximate (classes, test images) of CoOp's splits: to start the largest jobs first, and the ETA.
SIZES = {"imagenet": (1000, 50000), "caltech101": (100, 2465), "oxford_pets": (37, 3669), "stanford_cars": (196, 8041),
         "oxford_flowers": (102, 2463), "food101": (101, 30300), "fgvc_aircraft": (100, 3333), "sun397": (397, 19850),
         "dtd": (47, 1692), "eurosat": (10, 8100), "ucf101": (101, 3783), "imagenetv2": (1000, 10000),
         "imagenet_sketch": (1000, 50889), "imagenet_a": (200, 7500), "imagenet_r": (200, 30000)}
XD_TARGETS = [d for d, info in data.DATASETS.items() if info.test_only] + data.PAPER_DATASETS[1:]


@dataclass(frozen=True)
class Job:
    """A table's unit of work: base2new on `dataset` (train on base, test base, test new); or xd, a
    transductive method's model for target `dataset`, or another method's ImageNet model tested on `targets`."""
    protocol: str
    dataset: str
    seed: int
    targets: tuple = ()

    def __str__(self):
        return f"{self.protocol} {self.dataset} seed {self.seed}"


def table_jobs(args):
    """Every job of the table, in a fixed order (--job indexes it)."""
    if args.table == "base2new":
        return [Job("base2new", d, s) for d in args.datasets or data.PAPER_DATASETS for s in args.seeds]
    targets = tuple(args.datasets or XD_TARGETS)
    if train.load_method(args.method).transductive:
        return [Job("xd", t, s) for t in targets for s in args.seeds]
    return [Job("xd", "imagenet", s, targets) for s in args.seeds]


def job_cost(job, args):
    """The images a job reads, roughly: training images times epochs, and every test image."""
    classes, test = SIZES.get(job.dataset, (100, 1000))
    share = 0.5 if job.protocol == "base2new" and not train.load_method(args.method).transductive else 1
    return train.load_method(args.method).recipe.epochs * 16 * classes * share + test + sum(SIZES[t][1] for t in job.targets)


def run_job(job, args, execute):
    """The job's steps that are not finished, in order, through execute(script, argv) (None: stop at
    the first such step and return None). A step is finished when its results.json is of this method,
    seed and classes; an evaluation also must come from the model its training step tested (re-run
    otherwise). -> {base, new or the xd target: results} of every step."""
    flags = ["--method", args.method] + (["--no-refiner"] if args.no_refiner else []) + [
        item for name in train.load_method(args.method).recipe.weight_files if getattr(args, name)
        for item in (f"--{name.replace('_', '-')}", getattr(args, name))]
    common = ["--root", args.root, "--clip", args.clip, *(["--device", args.device] if args.device else [])]
    done = {}

    def step(script, folder, dataset, subsample, argv, trained=None):  # -> its results, None when it did not run
        expected = dict(dataset=dataset, subsample=subsample, split="test", method=args.method,
                        refiner=not args.no_refiner, checkpoint_sha256=trained and trained.get("checkpoint_sha256"))
        path = os.path.join(folder, "results.json")
        try:
            with open(path) as f:
                old = json.load(f)
            if all(old.get(k) == v for k, v in expected.items() if v is not None) and \
                    (old.get("args") or {}).get("seed") == job.seed:
                if execute:
                    print(f"skip: {folder} is finished")
                done[label(folder)] = old
                return old
        except (OSError, ValueError, AttributeError):
            pass  # absent or unreadable: the step runs (and refuses to replace what is not its own)
        if execute is None:
            return None
        execute(script, [*argv, "--output-dir", folder])
        with open(path) as f:
            done[label(folder)] = json.load(f)
        return done[label(folder)]

    def label(folder):  # base, new, or the xd target
        return os.path.basename(folder) if job.protocol == "base2new" else os.path.basename(os.path.dirname(folder))

    seed, root = ["--seed", str(job.seed)], os.path.join(args.runs, job.protocol)
    folder = os.path.join(root, job.dataset, f"seed{job.seed}")
    if job.protocol == "base2new":
        base = step("train.py", os.path.join(folder, "base"), job.dataset, "base",
                    [*flags, "--dataset", job.dataset, *common, *seed, "--subsample", "base", "--resume", *args.train_args])
        if base and not step("eval.py", os.path.join(folder, "new"), job.dataset, "new",
                             ["--checkpoint", base["checkpoint"], *common, "--subsample", "new", *args.eval_args], base):
            return None
    elif job.targets:  # one model trained on ImageNet, tested on every target
        source = step("train.py", folder, "imagenet", "all",
                      [*flags, "--xd", "--dataset", "imagenet", *common, *seed, "--resume", *args.train_args])
        for target in job.targets if source else ():
            if not step("eval.py", os.path.join(root, target, f"seed{job.seed}"), target, "all",
                        ["--checkpoint", source["checkpoint"], "--dataset", target, *common, *args.eval_args], source):
                return None
    else:  # transductive: a model per target, trained on its unlabelled images
        step("train.py", folder, job.dataset, "all", [*flags, "--xd", "--dataset", job.dataset, *common, *seed,
                                                      "--subsample", "all", "--shots", "0", "--resume", *args.train_args])
    steps = 2 if job.protocol == "base2new" else 1 + len(job.targets)
    return done if len(done) == steps else None


def execute_in_process(script, argv):
    """A step in this process, as its command line would run it (one-line errors: SystemExit(2))."""
    return (train.main if script == "train.py" else main)(argv)


def execute_with(launcher):
    """Steps as commands: `launcher script argv` (torchrun for several GPUs per job)."""
    def execute(script, argv):
        here = os.path.dirname(os.path.abspath(__file__))
        status = subprocess.run([*shlex.split(launcher), os.path.join(here, script), *argv]).returncode
        if status:
            raise SystemExit(status)
    return execute


def attempt(job, args):
    """run_job, its failure caught (one job's error must not end the table) -> a report of the job."""
    execute = execute_with(args.launcher) if args.launcher else execute_in_process
    t0, start, lines = time.perf_counter(), time.time(), io.StringIO()

    class Tee(io.TextIOBase):  # stderr as usual, and its last line for the failure message
        def write(self, text):
            lines.write(text)
            return sys.__stderr__.write(text)

    try:
        with contextlib.redirect_stderr(Tee()):
            done = run_job(job, args, execute)
        images = sum(r["num_images"] + r.get("train_images", 0) * r["args"].get("epochs", 0) for r in done.values())
        return dict(job=str(job), ok=True, results={k: r["accuracy"] for k, r in done.items()}, images=images,
                    seconds=time.perf_counter() - t0, pid=os.getpid(), start=start, end=time.time())
    except (Exception, SystemExit) as e:
        last = ([line for line in lines.getvalue().splitlines() if line.strip()] or [f"{type(e).__name__}: {e}"])[-1]
        if not isinstance(e, SystemExit):
            traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # an out-of-memory job leaves room for the next
        return dict(job=str(job), ok=False, error=last, images=0, seconds=time.perf_counter() - t0)


def table_worker(args, tasks, reports):
    """A slot: takes the next job until there is none; CLIP weights read once for all its jobs."""
    with clip_model.keep_loaded():
        while (task := tasks.get()) is not None:
            index, job = task
            reports.put(("start", index, os.getpid()))
            reports.put(("end", index, attempt(job, args)))


def run_table(args):
    """Every job of --table not yet finished, over the slots (--gpus x --jobs-per-gpu, largest jobs
    first), a line per finished job and the table's rate and ETA, then the report. -> the reports."""
    jobs = table_jobs(args)
    pending = [j for j in jobs if run_job(j, args, execute=None) is None]
    if args.list_jobs:
        for i, job in enumerate(jobs):
            print(f"{i}\t{job}\t{'finished' if job not in pending else 'to run'}")
        return jobs
    if args.job is not None:
        if not 0 <= args.job < len(jobs):
            raise UserError(f"--job {args.job}: the table has jobs 0..{len(jobs) - 1} (--list-jobs lists them)")
        pending = [jobs[args.job]] if jobs[args.job] in pending else []
    pending.sort(key=lambda j: -job_cost(j, args))
    cuda = args.device != "cpu" and torch.cuda.is_available()
    devices = [f"cuda:{i}" if cuda else "cpu" for i in range(args.gpus or (torch.cuda.device_count() if cuda else 1))]
    slots = [d for d in devices for _ in range(args.jobs_per_gpu)][:max(1, len(pending))]
    print(f"{args.table} table of --method {args.method}: {len(jobs)} job(s), {len(jobs) - len(pending)} finished "
          f"already, {len(pending)} to run on {len(slots)} slot(s) ({', '.join(slots)})")
    total, started, reports, progress = sum(job_cost(j, args) for j in pending), time.perf_counter(), [], [0]

    def finished(report, cost):
        reports.append(report)
        progress[0] += cost
        accuracies = ", ".join(f"{k} {v:.2f}" for k, v in report.get("results", {}).items())
        print(f"{report['job']}: {accuracies if report['ok'] else 'FAILED: ' + report['error']} "
              f"({report['seconds'] / 60:.1f} min)")
        spent = time.perf_counter() - started
        print(f"[{len(reports)}/{len(pending)} jobs] {sum(r['images'] for r in reports) / spent:.0f} images/s, "
              f"ETA {spent / progress[0] * (total - progress[0]) / 60:.1f} min")

    if len(slots) == 1 or args.launcher:
        args.device = args.device or (slots[0] if cuda and not args.launcher else None)
        with clip_model.keep_loaded():
            for job in pending:
                finished(attempt(job, args), job_cost(job, args))
    else:
        context = multiprocessing.get_context("spawn")
        tasks, queue, workers, running = context.Queue(), context.Queue(), {}, {}
        for index, job in enumerate(pending):
            tasks.put((index, job))

        def start(device):
            worker = context.Process(target=table_worker, args=(argparse.Namespace(**{**vars(args), "device": device}),
                                                                 tasks, queue), daemon=True)
            worker.start()
            workers[worker.pid] = (worker, device)

        for device in slots:
            tasks.put(None)
            start(device)
        while len(reports) < len(pending):
            try:
                kind, index, value = queue.get(timeout=5)
            except Empty:  # a worker that died with a job: that job failed, the slot restarts
                for pid, (worker, device) in list(workers.items()):
                    if not worker.is_alive():
                        del workers[pid]
                        lost = [i for i, p in running.items() if p == pid]
                        for i in lost:
                            del running[i]
                            finished(dict(job=str(pending[i]), ok=False, images=0, seconds=0, error=f"its worker "
                                          f"died (exit code {worker.exitcode})"), job_cost(pending[i], args))
                        if lost:
                            tasks.put(None)
                            start(device)
                continue
            if kind == "start":
                running[index] = value
            else:
                running.pop(index, None)
                finished(value, job_cost(pending[index], args))
        for worker, _ in workers.values():
            worker.join()
    failed = [r for r in reports if not r["ok"]]
    if os.path.isdir(os.path.join(args.runs, args.table)):
        try:
            report(os.path.join(args.runs, args.table))
        except UserError as e:
            print(f"report: {e}", file=sys.stderr)
    if failed:
        print("\n".join([f"{len(failed)} job(s) failed:"] + [f"  {r['job']}: {r['error']}" for r in failed]),
              file=sys.stderr)
        raise SystemExit(1)
    return reports


def check_table_args(p, args):
    args.method = args.method or "coop"
    train.load_method(args.method)  # a --method that cannot load fails before any job
    args.clip = args.clip or "ViT-B/16"
    for flag in ("root", "runs"):
        if getattr(args, flag) is None:
            p.error(f"--{flag} is required with --table")
    if not os.path.isdir(args.root):
        p.error(f"--root {args.root!r} is not a directory")
    unknown = [d for d in args.datasets or () if d not in data.DATASETS]
    if unknown:
        p.error(f"--datasets {unknown[0]!r}: expected some of {', '.join(data.DATASETS)}")
    if any(seed < 0 for seed in args.seeds):
        p.error(f"--seeds must be >= 0, got {args.seeds}")
    args.train_args, args.eval_args = shlex.split(args.train_args), shlex.split(args.eval_args)
    try:
        data.check_output_dir(args.runs, "--runs")
    except UserError as e:
        p.error(str(e))


def _main(argv):
    p = get_parser()
    args = p.parse_args(argv)
    if args.report:
        return report(args.report)
    if args.table:
        check_table_args(p, args)
        return run_table(args)
    check_args(p, args)
    return evaluate(args)


def main(argv=None):
    return train.run_main(_main, argv)


if __name__ == "__main__":
    main()
