"""The papers' tables: every job of a protocol for one --method, run over the GPUs, resumably, then
the report of the finished runs beside the published numbers (report.py).

    python tables.py run base2new --root /data --runs output/coop   # 11 datasets x seeds 1 2 3
    python tables.py run xd --method promptkd --teacher /teachers --root /data \
        --runs output/promptkd                                       # the cross-dataset table
    python tables.py run fewshot --root /data --runs output/coop    # 1 2 4 8 16 shots, 11 datasets
    python tables.py run base2new --root /data --runs output/coop --gpus 4 --jobs-per-gpu 2
    python tables.py run base2new --root /data --runs output/coop --datasets dtd --seeds 1 \
        --launcher "torchrun --standalone --nproc_per_node=4"       # one job over 4 GPUs
    python tables.py jobs base2new --root /data --runs output/coop  # the jobs, by index
    python tables.py run base2new --root /data --runs output/coop --job $SLURM_ARRAY_TASK_ID
    python tables.py report output/coop/base2new                    # mean±std over seeds, HM

A job is one dataset and seed (and number of shots). base2new trains on the base classes
(train.py) and tests the new ones with the model it tested (eval.py); xd trains on ImageNet and
tests every target (a transductive method: a model per target); fewshot trains on --shots K images
of every class with the method's few-shot recipe (train.py --few-shot) and tests every class, in
<runs>/fewshot/<dataset>/shots<K>/seed<S>. A step whose results.json is finished is skipped, an
interrupted training resumes. Each slot (--jobs-per-gpu on each of --gpus) is a worker process
that reads each CLIP file once; a failed job is listed at the end (exit status 1), the others go
on. --launcher runs each step as a command of its own instead (torchrun: a job over several GPUs).
"""
import argparse
import multiprocessing
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from queue import Empty

import torch

import clip_model
import data
import eval as eval_cli  # "eval" would shadow the builtin
import features
import flags
import outputs
import report
import textrefiner
import train
from data import UserError
from textrefiner import NON_NEGATIVE, POSITIVE


# ----------------------------------------------------------------------------- the jobs

# Approximate (classes, test images) of CoOp's splits: to start the largest jobs first, and the ETA.
SIZES = {"imagenet": (1000, 50000), "caltech101": (100, 2465), "oxford_pets": (37, 3669),
         "stanford_cars": (196, 8041), "oxford_flowers": (102, 2463), "food101": (101, 30300),
         "fgvc_aircraft": (100, 3333), "sun397": (397, 19850), "dtd": (47, 1692),
         "eurosat": (10, 8100), "ucf101": (101, 3783), "imagenetv2": (1000, 10000),
         "imagenet_sketch": (1000, 50889), "imagenet_a": (200, 7500), "imagenet_r": (200, 30000)}


@dataclass(frozen=True)
class Job:
    """A table's unit of work: base2new on `dataset` (train on base, test base, test new); or xd,
    a transductive method's model for target `dataset`, or another method's ImageNet model tested
    on `targets`."""
    protocol: str
    dataset: str
    seed: int
    targets: tuple = ()
    shots: int = None  # fewshot: the images per class trained on

    def __str__(self):
        if self.shots is None:
            return f"{self.protocol} {self.dataset} seed {self.seed}"
        return f"{self.protocol} {self.dataset} shots {self.shots} seed {self.seed}"


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
    if args.protocol == "fewshot":
        datasets = args.datasets or data.PAPER_DATASETS
        return [Job("fewshot", d, s, shots=k)
                for d in datasets for k in args.shots for s in args.seeds]
    targets = tuple(args.datasets or data.XD_TARGETS)
    if flags.load_method(args.method).transductive:
        return [Job("xd", t, s) for t in targets for s in args.seeds]
    return [Job("xd", "imagenet", s, targets) for s in args.seeds]


def job_cost(job, args):
    """The images a job reads, roughly: training images times epochs, and every test image."""
    classes, test = SIZES.get(job.dataset, (100, 1000))
    Method = flags.load_method(args.method)
    share = 0.5 if job.protocol == "base2new" and not Method.transductive else 1
    epochs, shots = Method.recipe.epochs, 16
    if job.protocol == "fewshot":
        epochs = Method.recipe.few_shot(job.shots, job.dataset).get("epochs", epochs)
        shots = job.shots
    trained = epochs * shots * classes * share
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
    if job.protocol == "fewshot":
        folder = os.path.join(args.runs, job.protocol, job.dataset, f"shots{job.shots}",
                              f"seed{job.seed}")
        return [Step("train.py", job.dataset, folder, job.dataset, "all",
                     (*trains, "--few-shot", "--dataset", job.dataset, "--subsample", "all",
                      "--shots", str(job.shots)))]
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
                    method=args.method, refiner=with_refiner(args), seed=job.seed, shots=job.shots,
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
    trained = done[training.label]
    if trained is not None and isinstance(trained.get("checkpoint"), str):
        # its checkpoint where the runs are now (moved or copied: not where it was written)
        tested = os.path.join(training.folder, os.path.basename(trained["checkpoint"]))
        trained = dict(trained, checkpoint=tested)
    for step in evaluations:
        if trained is None:
            return None
        done[step.label] = finish(step, job, args, trained, run_step)
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
        train.train(train.parse_args(argv, step=True))
    else:
        eval_cli.run(eval_cli.parse_args(argv, step=True))


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
    table.add_argument("protocol", choices=("base2new", "xd", "fewshot"))
    table.add_argument("--method", default="coop", help="as train.py's --method")
    for name in flags.input_names():
        flag = name.replace("_", "-")
        table.add_argument(f"--{flag}", help=f"train.py's --{flag} (an input of the method's)")
    table.add_argument("--no-refiner", action="store_true", help="the method without TextRefiner")
    table.add_argument("--root", required=True, help="data root")
    table.add_argument("--clip", default="ViT-B/16", help="CLIP name or weights file")
    table.add_argument("--runs", required=True, help="<runs>/<protocol>/<dataset>/seed<S>")
    table.add_argument("--datasets", nargs="+", help="default: the 11 datasets, or 14 xd targets")
    table.add_argument("--seeds", nargs="+", type=flags.ranged(int, flags.SEEDS), default=[1, 2, 3])
    table.add_argument("--shots", nargs="+", type=flags.ranged(int, POSITIVE),
                       help="fewshot: the images per class of its runs (default: 1 2 4 8 16)")
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
    sub.add_parser("report", help="summarise <runs>/base2new, xd or fewshot (report.py: every "
                                  "table of an output folder)").add_argument("folder")
    return p


def check_table_args(p, args):
    """Flag errors argparse cannot see; p.error exits with status 2 and the usage line."""
    flags.load_method(args.method)  # a --method that cannot load fails before any job
    if not os.path.isdir(args.root):
        p.error(f"--root {args.root!r} is not a directory")
    unknown = [d for d in args.datasets or () if d not in data.DATASETS]
    if unknown:
        p.error(f"--datasets {unknown[0]!r}: expected some of {', '.join(data.DATASETS)}")
    if args.shots and args.protocol != "fewshot":
        p.error(f"--shots is for the fewshot protocol; {args.protocol} runs train on 16 shots "
                f"(train.py's --shots)")
    if args.protocol == "fewshot":
        args.shots = args.shots or [1, 2, 4, 8, 16]
    try:
        outputs.check_output_dir(args.runs, "--runs")
    except UserError as e:
        p.error(str(e))
    gpus, visible = getattr(args, "gpus", None), torch.cuda.device_count()
    if gpus and visible and not args.launcher and args.device != "cpu" and gpus > visible:
        p.error(f"--gpus {gpus}: this machine has {visible} visible CUDA device(s)")
    check_passed_flags(p, args)


# What defines a job besides the flags its steps are given, refused in --train-args/--eval-args:
# -> the flag of tables.py that sets it (None: the protocol does). --device is not one: where a
# step runs is not what it computes (--device cpu there keeps a GPU host's table on the CPU).
JOB_FLAGS = {"--dataset": "--datasets", "--seed": "--seeds", "--output-dir": "--runs",
             "--method": "--method", "--refiner": "--no-refiner", "--no-refiner": "--no-refiner",
             "--subsample": None, "--xd": None, "--shots": None, "--few-shot": None,
             "--resume": None,
             "--checkpoint": None, "--split": None, "--zeroshot": None}


def check_passed_flags(p, args):
    """--train-args and --eval-args split as a shell would; a flag that defines the job (one its
    steps are given, JOB_FLAGS; for an evaluation also the inputs its training recorded) refused;
    then their values checked as train.py and eval.py would, at start rather than in every job."""
    job = table_jobs(args)[0]
    steps = job_steps(job, args, "cpu")
    recorded = {f"--{kind}{name.replace('_', '-')}" for name in ("clip", *flags.input_names())
                for kind in ("", "allow-other-")}
    for script, name in (("train.py", "train_args"), ("eval.py", "eval_args")):
        given, option = getattr(args, name), flags.flag(name)
        try:
            words = shlex.split(given)
        except ValueError as e:
            p.error(f"{option} {given!r}: {e} (a quote left open?)")
        own = {word for step in steps if step.script == script for word in step.argv
               if word.startswith("--") and word != "--device"}
        own |= set(JOB_FLAGS) | (recorded if script == "eval.py" else set())
        for flag in (word.split("=")[0] for word in words):
            if flag.startswith("--") and flag in own:
                ours = flag[2:].replace("-", "_") in vars(args)  # --root, --clip, --teacher
                instead = JOB_FLAGS.get(flag, flag if ours else None)
                how = f": give tables.py {instead} instead" if instead else " (by its protocol)"
                p.error(f"{option} {flag}: defines the job, which tables.py sets for each job{how}")
        setattr(args, name, words)
    try:
        train.parse_args([*steps[0].argv, *args.train_args, "--output-dir", steps[0].folder],
                         step=True)
    except UserError as e:
        p.error(f"--train-args: {e}")
    evaluation = eval_cli.get_parser()
    flags.raise_errors(evaluation, "eval.py")
    try:
        evaluation.parse_args(args.eval_args)
    except UserError as e:
        p.error(f"--eval-args: {e}")


def main(argv=None):
    with train.command_line():
        p = get_parser()
        args = p.parse_args(argv)
        if args.command == "report":
            return report.report_folder(args.folder)
        check_table_args(p, args)
        jobs = table_jobs(args)
        if args.command == "jobs":
            for i, job in enumerate(jobs):
                print(f"{i}\t{job}\t{'to run' if run_job(job, args) is None else 'finished'}")
            return jobs
        reports = run_table(args, jobs)
        if os.path.isdir(os.path.join(args.runs, args.protocol)):
            try:
                report.report_folder(os.path.join(args.runs, args.protocol))
            except UserError as e:
                print(e, file=sys.stderr)
        failed = [f"  {r['job']}: {r['error']}" for r in reports if not r["ok"]]
        if failed:
            print("\n".join([f"{len(failed)} job(s) failed:", *failed]), file=sys.stderr)
            raise SystemExit(1)
        return reports


if __name__ == "__main__":
    main()
