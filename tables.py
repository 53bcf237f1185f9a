"""The papers' tables: every job of a protocol for one --method, run over the GPUs, resumably, then
the report of the finished runs beside the published numbers.

    python tables.py run base2new --root /data --runs output/coop   # 11 datasets x seeds 1 2 3
    python tables.py run xd --method promptkd --teacher /teachers --root /data \
        --runs output/promptkd                                       # the cross-dataset table
    python tables.py run base2new --root /data --runs output/coop --gpus 4 --jobs-per-gpu 2
    python tables.py run base2new --root /data --runs output/coop --datasets dtd --seeds 1 \
        --launcher "torchrun --standalone --nproc_per_node=4"       # one job over 4 GPUs
    python tables.py jobs base2new --root /data --runs output/coop  # the jobs, by index
    python tables.py run base2new --root /data --runs output/coop --job $SLURM_ARRAY_TASK_ID
    python tables.py report output/coop/base2new                    # mean±std over seeds, HM

A job is one dataset and seed. base2new trains on the base classes (train.py) and tests the new
ones with the model it tested (eval.py); xd trains on ImageNet and tests every target (a
transductive method: a model per target). A step whose results.json is finished is skipped, an
interrupted training resumes. Each slot (--jobs-per-gpu on each of --gpus) is a worker process
that reads each CLIP file once; a failed job is listed at the end (exit status 1), the others go
on. --launcher runs each step as a command of its own instead (torchrun: a job over several GPUs).
"""
import argparse
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
import eval as eval_cli  # "eval" would shadow the builtin
import features
import flags
import outputs
import textrefiner
import train
from data import UserError
from textrefiner import METHODS, NON_NEGATIVE, POSITIVE


def host_average(row, numbers, source, result="result"):
    """What a host's paper or README published: its 11-dataset average, none with TextRefiner."""
    return dict(note=f"Published 11-dataset averages (ViT-B/16, 16 shots, seeds 1-3; {source}); no "
                     f"{result} of {row} with TextRefiner was published:", base2new={row: numbers})


# What the report prints beside our numbers, per method: note, base2new {row: (base, new, HM)},
# and optionally base2new_datasets (column tag, {dataset: (base, new, HM)}), xd (tag, {dataset:
# accuracy}) and xd_note.
PUBLISHED = {
    "coop": dict(
        note="Published 11-dataset averages (ViT-B/16, 16 shots, seeds 1-3):",
        base2new={"CoOp": (82.69, 63.22, 71.66), "CoOp+TextRefiner": (79.74, 74.32, 76.94)}),
    "promptkd": dict(
        note="Published 11-dataset averages (ViT-B/16 student, seeds 1-3; PromptKD+TextRefiner: "
             "the TextRefiner paper, 16 unlabelled shots; PromptKD and the PK columns: PromptKD's "
             "README, the full unlabelled train set):",
        base2new={"PromptKD+TextRefiner": (85.22, 79.64, 82.33), "PromptKD": (86.96, 80.73, 83.73)},
        base2new_datasets=("PK", {  # PromptKD's README: base, new, HM
            "imagenet": (80.83, 74.66, 77.62), "caltech101": (98.91, 96.65, 97.77),
            "oxford_pets": (96.30, 98.01, 97.15), "stanford_cars": (82.80, 83.37, 83.13),
            "oxford_flowers": (99.42, 82.62, 90.24), "food101": (92.43, 93.68, 93.05),
            "fgvc_aircraft": (49.12, 41.81, 45.17), "sun397": (83.69, 81.54, 82.60),
            "dtd": (85.84, 71.37, 77.94), "eurosat": (97.54, 82.08, 89.14),
            "ucf101": (89.71, 82.27, 86.10)}),
        xd=("PromptKD", {"caltech101": 93.61, "oxford_pets": 91.59, "stanford_cars": 73.93,
                         "oxford_flowers": 75.33, "food101": 88.84, "fgvc_aircraft": 26.24,
                         "sun397": 68.57, "dtd": 55.08, "eurosat": 63.74, "ucf101": 76.39}),
        xd_note="PromptKD: its published transductive cross-dataset accuracy (PromptKD README; "
                "full unlabelled target train sets)"),
    "cocoop": host_average("CoCoOp", (80.47, 71.69, 75.83), "the CoCoOp paper"),
    "kgcoop": host_average("KgCoOp", (80.73, 73.60, 77.00), "KgCoOp's README"),
    "ivlp": host_average("IVLP", (84.21, 71.79, 77.51),
                         "IVLP 4 + 4, depth 9, 20 epochs, in PromptSRC's README"),
    "maple": host_average("MaPLe", (82.28, 75.14, 78.55), "MaPLe's README", "11-dataset result"),
    "promptsrc": host_average("PromptSRC", (84.26, 76.10, 79.97), "PromptSRC's README"),
}

# ----------------------------------------------------------------------------- the report


def harmonic_mean(base, new):
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def dataset_dirs(root):
    """The <root>/<dataset> folders (files such as report.json are not runs)."""
    return [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]


def seed_dirs(folder, problems):
    """[(S, <folder>/seed<S>)] in order of S; any other entry is added to problems."""
    found = []
    for name in sorted(os.listdir(folder)):
        path, digits = os.path.join(folder, name), name[len("seed"):]
        if name.startswith("seed") and digits.isdigit() and os.path.isdir(path):
            found.append((int(digits), path))
        else:
            problems.append(f"{path}: unexpected (runs are folders seed<N>); move it out")
    return sorted(found)


def is_percentage(accuracy, images):
    """accuracy: a number in [0, 100], a whole number of the images when their count is known."""
    if type(accuracy) not in (int, float) or not 0 <= accuracy <= 100:
        return False
    correct = accuracy * images / 100 if type(images) is int and images > 0 else 0
    return abs(correct - round(correct)) <= 1e-6


def read_result(path, dataset, subsample, seed, problems):
    """A results.json once it is checked to be the test of `dataset` on `subsample` classes, of
    the seed its folder says, a percentage for accuracy; None (and a line in problems) otherwise."""
    result = outputs.read_json(path)
    if result is None:
        problems.append(f"{path}: unreadable, or not a results.json (a JSON object); re-run that "
                        f"step or move its folder out")
        return None
    expected = dict(dataset=dataset, subsample=subsample, split="test")
    wrong = {key: result.get(key) for key in outputs.results_match(result, **expected)}
    if wrong:
        problems.append(f"{path}: holds {wrong}, but its folder is for {expected}; move the file "
                        f"to its place or re-run that step")
    elif not is_percentage(result.get("accuracy"), result.get("num_images")):
        of = f" of its {result['num_images']} images" if "num_images" in result else ""
        problems.append(f"{path}: accuracy is {result.get('accuracy')!r}, expected a number: a "
                        f"percentage in [0, 100]{of}; re-run that step")
    elif outputs.results_match(result, seed=seed):
        problems.append(f"{path}: a run of seed {(result.get('args') or {}).get('seed')} in the "
                        f"folder of seed {seed}; move it to its place")
    else:
        result.setdefault("method", "coop")
        result.setdefault("refiner", not (result.get("args") or {}).get("no_refiner", False))
        return result
    return None


def collect_base2new(root, problems, seen):
    """{dataset: {seed: (base acc, new acc)}} from <root>/<dataset>/seed<S>/{base,new}/results.json,
    each new/ checked to be evaluated from the model its base/ tested. seen: {(method, refiner,
    selection): first path}."""
    runs = {}
    for dataset in dataset_dirs(root):
        for seed, folder in seed_dirs(os.path.join(root, dataset), problems):
            paths = {part: os.path.join(folder, part, "results.json") for part in ("base", "new")}
            if not all(map(os.path.isfile, paths.values())):
                if os.path.isdir(os.path.join(folder, "base")):
                    missing = " and no ".join(p for p in paths.values() if not os.path.isfile(p))
                    print(f"note: {folder} is unfinished (no {missing}); left out", file=sys.stderr)
                continue
            base, new = (read_result(paths[part], dataset, part, seed, problems) for part in paths)
            if not (base and new):
                continue
            model = {key: base.get(key) for key in ("method", "refiner", "checkpoint_sha256")}
            if differs := outputs.results_match(new, **model):
                problems.append(f"{paths['new']}: evaluated from another model than "
                                f"{paths['base']} tested (its {differs[0]} differs); re-run make "
                                f"base2new (it re-evaluates new/) or move the folder out")
            else:
                kind = (base["method"], base["refiner"], base.get("selection"))
                seen.setdefault(kind, paths["base"])
                runs.setdefault(dataset, {})[seed] = (base["accuracy"], new["accuracy"])
    return runs


def collect_xd(root, problems, seen):
    """{target: {seed: accuracy}} from <root>/<target>/seed<S>/results.json."""
    runs = {}
    for target in dataset_dirs(root):
        for seed, folder in seed_dirs(os.path.join(root, target), problems):
            path = os.path.join(folder, "results.json")
            if not os.path.isfile(path):
                continue
            if result := read_result(path, target, "all", seed, problems):
                kind = (result["method"], result["refiner"], result.get("selection"))
                seen.setdefault(kind, path)
                runs.setdefault(target, {})[seed] = result["accuracy"]
    return runs


def summarise_base2new(runs):
    """Per dataset: mean and std (population, as CoOp's parse_test_res) over seeds of base and new
    accuracy, and HM of the means; the average row is the mean over the paper's datasets present,
    HM of those means (how the paper's tables compute it)."""
    rows = {}
    for dataset, seeds in runs.items():
        acc = np.array(list(seeds.values()))  # (S, 2)
        base, new = acc.mean(0)
        rows[dataset] = dict(seeds=sorted(seeds), base=base, new=new, hm=harmonic_mean(base, new),
                             base_std=acc[:, 0].std(), new_std=acc[:, 1].std())
    paper = [d for d in data.PAPER_DATASETS if d in rows]
    average = None
    if paper:
        base, new = (float(np.mean([rows[d][key] for d in paper])) for key in ("base", "new"))
        average = dict(datasets=paper, base=base, new=new, hm=harmonic_mean(base, new))
    return dict(datasets=rows, average=average)


def summarise_xd(runs):
    """Per target (ImageNet, its variants, then the others): mean and std over seeds."""
    variants = [d for d, info in data.DATASETS.items() if info.test_only]
    known = ["imagenet", *variants, *data.PAPER_DATASETS[1:]]
    order = [t for t in known if t in runs] + sorted(t for t in runs if t not in known)
    return {t: dict(seeds=sorted(runs[t]), accuracy=float(np.mean(list(runs[t].values()))),
                    std=float(np.std(list(runs[t].values())))) for t in order}


# Report cells: a mean right-aligned in MEAN_W characters, then "±std" in STD_W + 1 (blank when
# there is no std); column headings are right-aligned over the means with the same widths.
MEAN_W, STD_W, GAP = 8, 5, "  "


def value_cell(mean, std=None, with_std=True):
    spread = "" if not with_std else f"±{std:<{STD_W}.2f}" if std is not None else " " * (STD_W + 1)
    return f"{mean:>{MEAN_W}.2f}" + spread


def heading_cell(name, with_std=True):
    return f"{name:>{MEAN_W}}" + (" " * (STD_W + 1) if with_std else "")


def format_table(rows):
    """rows: [label, seeds, *cells], the heading row first; the two text columns as wide as their
    longest entry."""
    label_w, seeds_w = (max(len(r[i]) for r in rows) for i in (0, 1))
    return [GAP.join([r[0].ljust(label_w), r[1].ljust(seeds_w), *r[2:]]).rstrip() for r in rows]


def published_cells(numbers):
    """Cells of a published (base, new, HM) row; blanks where there is none."""
    if numbers is None:
        return [" " * MEAN_W] * 3
    return [value_cell(v, with_std=False) for v in numbers]


def published_average(published, datasets):
    """(base, new, HM) of published per-dataset numbers averaged over `datasets`, as ours is."""
    base = float(np.mean([published[d][0] for d in datasets]))
    new = float(np.mean([published[d][1] for d in datasets]))
    return base, new, harmonic_mean(base, new)


def format_base2new(summary, title, published):
    """The paper's table; a method's published per-dataset numbers sit beside ours."""
    rows, average = summary["datasets"], summary["average"]
    tag, beside = published.get("base2new_datasets", (None, None))
    headings = [heading_cell("Base"), heading_cell("New"), heading_cell("HM", with_std=False)]
    theirs = [heading_cell(f"{tag} {h}", False) for h in ("Base", "New", "HM")] if beside else []
    table = [["Dataset", "Seeds", *headings, *theirs]]
    if average:
        n, present = len(data.PAPER_DATASETS), len(average["datasets"])
        theirs = published_cells(published_average(beside, average["datasets"])) if beside else []
        table.append(["Average" if present == n else f"Average ({present}/{n})", "",
                      value_cell(average["base"]), value_cell(average["new"]),
                      value_cell(average["hm"], with_std=False), *theirs])
    others = sorted(d for d in rows if d not in data.PAPER_DATASETS)
    for d in [d for d in data.PAPER_DATASETS if d in rows] + others:
        r, theirs = rows[d], published_cells(beside.get(d)) if beside else []
        table.append([data.DATASETS[d].paper_name or d, ",".join(map(str, r["seeds"])),
                      value_cell(r["base"], r["base_std"]), value_cell(r["new"], r["new_std"]),
                      value_cell(r["hm"], with_std=False), *theirs])
    averages = [[name, "", value_cell(b), value_cell(n), value_cell(h, with_std=False)]
                for name, (b, n, h) in published.get("base2new", {}).items()]
    lines = format_table(table + averages)
    note = [published["note"]] if averages else []
    return "\n".join([title, *lines[:len(table)], *note, *lines[len(table):]])


def format_xd(summary, title, published):
    """One accuracy per target; a method's published cross-dataset numbers beside ours."""
    tag, beside = published.get("xd", (None, None))
    theirs = [heading_cell(tag, False)] if beside else []
    table = [["Dataset", "Seeds", heading_cell("Accuracy"), *theirs]]
    for t, r in summary.items():
        theirs = value_cell(beside[t], with_std=False) if t in (beside or {}) else " " * MEAN_W
        table.append([t, ",".join(map(str, r["seeds"])), value_cell(r["accuracy"], r["std"])]
                     + ([theirs] if beside else []))
    return "\n".join([title, *format_table(table)] + ([published["xd_note"]] if beside else []))


def report(root):
    """Print and write <root>/report.json: base2new layout when the runs have base/ and new/, else
    one accuracy per dataset (xd). Every results.json is checked first (readable, a percentage for
    accuracy, the dataset/subsample/split and seed its folder says; no stray folders; one method):
    each problem is printed on its own line and no report is made."""
    if not os.path.isdir(root):
        raise UserError(f"report {root!r}: not a directory")
    problems, seen = [], {}
    runs = collect_base2new(root, problems, seen)
    xd = {} if runs or problems else collect_xd(root, problems, seen)
    models = sorted({(method, refiner) for method, refiner, _ in seen}, key=str)
    if len(models) > 1:
        mixed = ", ".join(f"{m}{'' if refiner else ' without TextRefiner'}: {p}"
                          for (m, refiner, _), p in sorted(seen.items(), key=str))
        problems.append(f"{root} mixes methods ({mixed}); one table per method: move one method's "
                        f"runs elsewhere")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        raise UserError(f"report {root}: {len(problems)} problem(s) above; no report made")
    if not runs and not xd:
        raise UserError(f"report {root}: no finished runs (<dataset>/seed<S>/results.json)")
    (method, refiner), Method = models[0], METHODS.get(models[0][0])
    name = (Method.title or Method.__name__) if Method else method
    title = f"{name} + TextRefiner" if refiner else name
    selections = sorted({s for *_, s in seen if s})
    selection = "; ".join(f"{s} ({train.SELECTIONS.get(s, s)})" for s in selections)
    selection = f"Model selection: {selection or 'not recorded'}"
    if runs:
        summary = dict(summarise_base2new(runs), method=method, refiner=refiner,
                       selection=selections)
        text = format_base2new(summary, f"{title}: base-to-new generalisation in {root} (mean±std "
                                        f"over seeds; HM of the mean base and new)\n{selection}",
                               PUBLISHED.get(method, {}))
    else:
        summary = summarise_xd(xd)
        text = format_xd(summary, f"{title}: accuracy in {root} (mean±std over seeds)\n{selection}",
                         PUBLISHED.get(method, {}))
    print(text)
    path, old = os.path.join(root, "report.json"), None
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if old != json.dumps(summary, indent=2):  # a report of the same runs changes no file
        outputs.write_json(summary, path, shared=True)  # runs of one table may report at once
    return summary

# ----------------------------------------------------------------------------- the jobs

# Approximate (classes, test images) of CoOp's splits: to start the largest jobs first, and the ETA.
SIZES = {"imagenet": (1000, 50000), "caltech101": (100, 2465), "oxford_pets": (37, 3669),
         "stanford_cars": (196, 8041), "oxford_flowers": (102, 2463), "food101": (101, 30300),
         "fgvc_aircraft": (100, 3333), "sun397": (397, 19850), "dtd": (47, 1692),
         "eurosat": (10, 8100), "ucf101": (101, 3783), "imagenetv2": (1000, 10000),
         "imagenet_sketch": (1000, 50889), "imagenet_a": (200, 7500), "imagenet_r": (200, 30000)}
XD_TARGETS = [d for d, info in data.DATASETS.items() if info.test_only] + data.PAPER_DATASETS[1:]


@dataclass(frozen=True)
class Job:
    """A table's unit of work: base2new on `dataset` (train on base, test base, test new); or xd,
    a transductive method's model for target `dataset`, or another method's ImageNet model tested
    on `targets`."""
    protocol: str
    dataset: str
    seed: int
    targets: tuple = ()

    def __str__(self):
        return f"{self.protocol} {self.dataset} seed {self.seed}"


@dataclass(frozen=True)
class Step:
    """A step of a job: train.py, or eval.py of the model its job's training tested."""
    script: str
    label: str  # its name in the job's line: base, new, or the dataset
    folder: str  # its --output-dir
    dataset: str
    subsample: str
    argv: tuple  # its flags, but --checkpoint, --resume, --train-args/--eval-args, --output-dir


def table_jobs(args):
    """Every job of the table, in a fixed order (--job indexes it)."""
    if args.protocol == "base2new":
        datasets = args.datasets or data.PAPER_DATASETS
        return [Job("base2new", d, s) for d in datasets for s in args.seeds]
    targets = tuple(args.datasets or XD_TARGETS)
    if flags.load_method(args.method).transductive:
        return [Job("xd", t, s) for t in targets for s in args.seeds]
    return [Job("xd", "imagenet", s, targets) for s in args.seeds]


def job_cost(job, args):
    """The images a job reads, roughly: training images times epochs, and every test image."""
    classes, test = SIZES.get(job.dataset, (100, 1000))
    Method = flags.load_method(args.method)
    share = 0.5 if job.protocol == "base2new" and not Method.transductive else 1
    trained = Method.recipe.epochs * 16 * classes * share
    return trained + test + sum(SIZES[t][1] for t in job.targets)


def with_refiner(args):
    """Whether the table's runs train TextRefiner: a method with its settings, not --no-refiner."""
    return not args.no_refiner and issubclass(flags.load_method(args.method).recipe, textrefiner.RefinerRecipe)


def job_steps(job, args, device):
    """The job's training step, then the evaluations of the model it tests."""
    method = ["--method", args.method, *(["--no-refiner"] if args.no_refiner else [])]
    for name in flags.load_method(args.method).recipe.weight_files:
        if getattr(args, name):
            method += [f"--{name.replace('_', '-')}", getattr(args, name)]
    common = ["--root", args.root, "--clip", args.clip, *(["--device", device] if device else [])]
    trains = (*method, *common, "--seed", str(job.seed))
    folder = os.path.join(args.runs, job.protocol, job.dataset, f"seed{job.seed}")
    if job.protocol == "base2new":
        return [Step("train.py", "base", os.path.join(folder, "base"), job.dataset, "base",
                     (*trains, "--dataset", job.dataset, "--subsample", "base")),
                Step("eval.py", "new", os.path.join(folder, "new"), job.dataset, "new",
                     (*common, "--subsample", "new"))]
    if job.targets:  # one model trained on ImageNet, tested on every target
        tests = [Step("eval.py", t, os.path.join(args.runs, "xd", t, f"seed{job.seed}"), t, "all",
                      (*common, "--dataset", t)) for t in job.targets]
        return [Step("train.py", "imagenet", folder, "imagenet", "all",
                     (*trains, "--xd", "--dataset", "imagenet")), *tests]
    # transductive: a model per target, trained on its unlabelled images
    return [Step("train.py", job.dataset, folder, job.dataset, "all",
                 (*trains, "--xd", "--dataset", job.dataset, "--subsample", "all", "--shots", "0"))]


def finish(step, job, args, trained, run_step):
    """The step's results: its results.json when that is finished (of this method, seed and
    classes; an evaluation's also of the model its training tested), else those of running it
    through run_step(script, argv); None when it is not finished and run_step is None."""
    path = os.path.join(step.folder, "results.json")
    result = outputs.read_json(path)
    expected = dict(dataset=step.dataset, subsample=step.subsample, split="test",
                    method=args.method, refiner=with_refiner(args), seed=job.seed,
                    checkpoint_sha256=None if trained is None else trained.get("checkpoint_sha256"))
    if result is not None and not outputs.results_match(result, **expected):
        if run_step:
            print(f"skip: {step.folder} is finished")
        return result
    if run_step is None:
        return None
    if step.script == "train.py":
        argv = [*step.argv, "--resume", *args.train_args]
    else:
        argv = [*step.argv, "--checkpoint", trained["checkpoint"], *args.eval_args]
    run_step(step.script, [*argv, "--output-dir", step.folder])
    result = outputs.read_json(path)
    if result is None:
        raise UserError(f"{step.script} wrote no {path}")
    return result


def run_job(job, args, device=None, run_step=None):
    """The job's steps in order, the finished ones skipped, the others run through run_step (None:
    stop at the first of them). -> {base, new or the dataset: results} of every step, or None."""
    training, *evaluations = job_steps(job, args, device)
    done = {training.label: finish(training, job, args, None, run_step)}
    for step in evaluations:
        if done[training.label] is None:
            return None
        done[step.label] = finish(step, job, args, done[training.label], run_step)
    return None if None in done.values() else done

# ----------------------------------------------------------------------------- the workers


def run_step(script, argv, launcher=None):
    """train.py or eval.py with argv: its functions called in this process, or the command
    `launcher script argv` (torchrun: a step over several GPUs)."""
    if launcher:
        here = os.path.dirname(os.path.abspath(__file__))
        command = [*shlex.split(launcher), os.path.join(here, script), *argv]
        if status := subprocess.run(command).returncode:
            raise UserError(f"{shlex.join(command)} exited with status {status}")
    elif script == "train.py":
        train.train(train.parse_args(argv))
    else:
        eval_cli.run(eval_cli.parse_args(argv))


def attempt(job, args, device):
    """run_job with its failure caught (one job's error must not end the table) -> its report."""
    start = time.perf_counter()
    try:
        done = run_job(job, args, device,
                       run_step=lambda script, argv: run_step(script, argv, args.launcher))
        images = sum(r["num_images"] + r.get("train_images", 0) * r["args"].get("epochs", 0)
                     for r in done.values())
        return dict(job=str(job), ok=True, results={k: r["accuracy"] for k, r in done.items()},
                    images=images, seconds=time.perf_counter() - start)
    except UserError as e:
        error = train.one_line(e)
    except SystemExit as e:  # a flag error (argparse printed it), a non-finite loss, a stalled rank
        error = e.code if isinstance(e.code, str) else f"exit status {e.code} (its error is above)"
    except Exception as e:  # a bug, or out of memory: its traceback too
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}".splitlines()[0]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # an out-of-memory job leaves room for the next
    return dict(job=str(job), ok=False, error=error, images=0, seconds=time.perf_counter() - start)


def table_worker(args, device, tasks, reports, start_method):
    """A slot's process: the next job until there is none; each CLIP file read once for all, and
    the evaluation images' features of a frozen image tower computed once for all (a
    features.FeatureCache kept for the worker's runs; with --feature-store, also on disk). Its
    loaders start their workers as the table's process would (start_method: on Linux fork, where
    a spawned process's default, spawn, would import torch again in every loader worker)."""
    multiprocessing.set_start_method(start_method, force=True)
    cache = features.FeatureCache(args.feature_store, int(args.feature_store_gib * 2**30))
    with clip_model.keep_loaded(), features.kept(cache):
        while (task := tasks.get()) is not None:
            index, job = task
            reports.put(("start", index, os.getpid()))
            reports.put(("end", index, attempt(job, args, device)))


def slots(args, jobs):
    """Where jobs run at once, at most one per job: --jobs-per-gpu on each of --gpus GPUs (default:
    every visible one), or CPU slots (--device cpu, or no GPU); --launcher's commands place
    themselves (its steps get --device only when the table was given one)."""
    if args.launcher:
        devices = [args.device]
    elif args.device != "cpu" and torch.cuda.is_available():
        devices = [f"cuda:{i}" for i in range(args.gpus or torch.cuda.device_count())]
    else:
        devices = ["cpu"] * (args.gpus or 1)
    return [d for d in devices for _ in range(args.jobs_per_gpu)][:len(jobs)]


def run_table(args, jobs):
    """The table's unfinished jobs (the largest first) over the slots, a worker process each: a
    line per finished job with the table's rate and ETA. A worker that dies fails its job and is
    replaced. -> the jobs' reports."""
    if args.feature_store:
        outputs.check_output_dir(args.feature_store, "--feature-store")
    pending = [job for job in jobs if run_job(job, args) is None]
    pending.sort(key=lambda job: -job_cost(job, args))
    if args.job is not None:
        if not 0 <= args.job < len(jobs):
            raise UserError(f"--job {args.job}: the table has jobs 0..{len(jobs) - 1} (tables.py "
                            f"jobs lists them)")
        pending = [jobs[args.job]] if jobs[args.job] in pending else []
    where = slots(args, pending)
    names = ", ".join(device or "launcher" for device in where)
    on = f" on {len(where)} slot(s) ({names})" if pending else ""
    print(f"{args.protocol} table of --method {args.method}: {len(jobs)} job(s), "
          f"{len(jobs) - len(pending)} finished already, {len(pending)} to run{on}")
    context = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
    loaders = multiprocessing.get_start_method()  # how the workers' loaders start theirs
    tasks, queue, workers, running, reports = context.Queue(), context.Queue(), {}, {}, []
    for index, job in enumerate(pending):
        tasks.put((index, job))

    def start(device):
        tasks.put(None)  # where this worker stops
        # not a daemon: a daemon may not start the loader's worker processes
        worker = context.Process(target=table_worker, args=(args, device, tasks, queue, loaders))
        worker.start()
        workers[worker] = device

    def replace_dead():
        """A worker that died with a job: that job failed, the slot restarts."""
        for worker, device in list(workers.items()):
            lost = [i for i, pid in running.items() if pid == worker.pid]
            if lost and not worker.is_alive():
                del workers[worker], running[lost[0]]
                reports.append(dict(job=str(pending[lost[0]]), ok=False, images=0, seconds=0,
                                    error=f"its worker died (exit code {worker.exitcode})"))
                progress.show(reports[-1], job_cost(pending[lost[0]], args))
                start(device)
        if not any(worker.is_alive() for worker in workers):  # e.g. each failed to start
            codes = ", ".join(str(worker.exitcode) for worker in workers)
            raise UserError(f"every table worker died (exit codes {codes}); see the errors above")

    for device in where:
        start(device)
    progress = Progress(sum(job_cost(j, args) for j in pending), len(pending))
    try:
        while len(reports) < len(pending):
            try:
                kind, index, value = queue.get(timeout=5)
            except Empty:
                replace_dead()
                continue
            if kind == "start":
                running[index] = value
            else:
                del running[index]
                reports.append(value)
                progress.show(value, job_cost(pending[index], args))
    except BaseException:  # Ctrl-C, every worker dead: the workers end with the table
        for worker in workers:
            worker.terminate()
        raise
    finally:
        for worker in workers:
            worker.join()
    return reports


class Progress:
    """A line per finished job, then the table's images/s and ETA."""

    def __init__(self, cost, jobs):
        self.cost, self.jobs, self.start = cost, jobs, time.perf_counter()
        self.done, self.images, self.finished = 0, 0, 0

    def show(self, report, cost):
        self.done += cost
        self.images += report["images"]
        self.finished += 1
        accuracies = ", ".join(f"{k} {v:.2f}" for k, v in report.get("results", {}).items())
        print(f"{report['job']}: {accuracies if report['ok'] else 'FAILED: ' + report['error']} "
              f"({report['seconds'] / 60:.1f} min)")
        spent = time.perf_counter() - self.start
        eta = spent / self.done * (self.cost - self.done) / 60
        print(f"[{self.finished}/{self.jobs} jobs] {self.images / spent:.0f} images/s, ETA "
              f"{eta:.1f} min")

# ----------------------------------------------------------------------------- the command line


def get_parser():
    p = argparse.ArgumentParser(description="The papers' tables: run their jobs over the GPUs, "
                                            "list them, or report finished runs.")
    sub = p.add_subparsers(dest="command", required=True)
    table = argparse.ArgumentParser(add_help=False)
    table.add_argument("protocol", choices=("base2new", "xd"))
    table.add_argument("--method", default="coop", help="as train.py's --method")
    for name in sorted({name for Model in METHODS.values() for name in Model.recipe.weight_files}):
        flag = name.replace("_", "-")
        table.add_argument(f"--{flag}", help=f"train.py's --{flag} (an input of the method's)")
    table.add_argument("--no-refiner", action="store_true", help="the method without TextRefiner")
    table.add_argument("--root", required=True, help="data root")
    table.add_argument("--clip", default="ViT-B/16", help="CLIP name or weights file")
    table.add_argument("--runs", required=True, help="<runs>/<protocol>/<dataset>/seed<S>")
    table.add_argument("--datasets", nargs="+", help="default: the 11 datasets, or 14 xd targets")
    table.add_argument("--seeds", nargs="+", type=flags.ranged(int, flags.SEEDS), default=[1, 2, 3])
    table.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    table.add_argument("--train-args", default="", help="more train.py flags, as one string")
    table.add_argument("--eval-args", default="", help="more eval.py flags, as one string")
    run = sub.add_parser("run", parents=[table], help="run the unfinished jobs, then report")
    run.add_argument("--gpus", type=flags.ranged(int, NON_NEGATIVE),
                     help="GPUs to use (default: every visible one); with --device cpu, CPU slots (default 1)")
    run.add_argument("--jobs-per-gpu", type=flags.ranged(int, POSITIVE), default=1,
                     help="jobs at once on one GPU")
    run.add_argument("--launcher", help="run every step as a command with this prefix (torchrun: "
                                        "a job over several GPUs)")
    run.add_argument("--job", type=int, help="run only the job of this index (a SLURM array task)")
    run.add_argument("--feature-store", metavar="DIR",
                     help="also keep the frozen image tower's features of the evaluation images "
                          "on disk here, for later tables (default: in each worker's memory)")
    run.add_argument("--feature-store-gib", type=flags.ranged(float, POSITIVE), default=16.0,
                     help="the most --feature-store may hold; the least recently used entries go")
    sub.add_parser("jobs", parents=[table], help="print the jobs, one per line with its index")
    sub.add_parser("report", help="summarise <runs>/base2new or <runs>/xd").add_argument("folder")
    return p


def check_table_args(p, args):
    """Flag errors argparse cannot see; p.error exits with status 2 and the usage line."""
    flags.load_method(args.method)  # a --method that cannot load fails before any job
    if not os.path.isdir(args.root):
        p.error(f"--root {args.root!r} is not a directory")
    unknown = [d for d in args.datasets or () if d not in data.DATASETS]
    if unknown:
        p.error(f"--datasets {unknown[0]!r}: expected some of {', '.join(data.DATASETS)}")
    args.train_args, args.eval_args = shlex.split(args.train_args), shlex.split(args.eval_args)
    try:
        outputs.check_output_dir(args.runs, "--runs")
    except UserError as e:
        p.error(str(e))


def main(argv=None):
    with train.command_line():
        p = get_parser()
        args = p.parse_args(argv)
        if args.command == "report":
            return report(args.folder)
        check_table_args(p, args)
        jobs = table_jobs(args)
        if args.command == "jobs":
            for i, job in enumerate(jobs):
                print(f"{i}\t{job}\t{'to run' if run_job(job, args) is None else 'finished'}")
            return jobs
        reports = run_table(args, jobs)
        if os.path.isdir(os.path.join(args.runs, args.protocol)):
            try:
                report(os.path.join(args.runs, args.protocol))
            except UserError as e:
                print(f"report: {e}", file=sys.stderr)
        failed = [f"  {r['job']}: {r['error']}" for r in reports if not r["ok"]]
        if failed:
            print("\n".join([f"{len(failed)} job(s) failed:", *failed]), file=sys.stderr)
            raise SystemExit(1)
        return reports


if __name__ == "__main__":
    main()
