"""Benchmarks that time the code users run: a method's training step and evaluation with and
without TextRefiner, a whole train.py run split by phase, a small table, and the image loader. No
data or weights needed.

    python bench.py step                            # CoOp+TextRefiner vs CoOp (train), vs zero-shot
    python bench.py step --eval --num-classes 1000  # inference images/s
    python bench.py step --method promptkd          # + a random ViT-L/14 teacher
    python bench.py step --clip tiny --device cpu   # smoke test
    python bench.py run                             # train.py's train() on synthetic 500x375 JPEGs
    python bench.py run --clip tiny --device cpu --workers 2
    python bench.py table --clip tiny --device cpu --size 32  # separate processes vs one table,
                                                              # with and without the caches
    python bench.py loader --dataset imagenet --root ~/data --workers 8
    python bench.py decode --dataset imagenet --root ~/data  # test images/s: PIL vs decode on GPU
    python bench.py synthetic work/demo --dataset caltech101 --classes 10 --images 32  # + tiny CLIP

Targets: a training step with TextRefiner at most 1.10x the host's; evaluation images/s with
TextRefiner at least 0.95x the host's. The models alternate within every round, the order
rotating (kernels.bench.time_interleaved), so a busy machine slows all of them alike; each result
is a median.
"""
import argparse
import collections
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

import clip_model
import data
import eval as eval_cli  # "eval" would shadow the builtin
import flags
import released
import tables
import textrefiner
import train
from data import UserError
from textrefiner import NON_NEGATIVE, POSITIVE, Range
from kernels.bench import time_interleaved
from tables import table_worker as tables_worker

TRAIN_STEP_TARGET, EVAL_RATE_TARGET = 1.10, 0.95
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # the image files TableCounts counts


def synced_seconds(fn):
    """Wall seconds of one fn(), the device synchronised before and after."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def step(args, Method, recipe):
    """Median step time of the method's benchmark models (Method.benchmark_models: with and without
    TextRefiner, and any the method adds) on random weights and a synthetic uint8 batch, through
    train.train_step (training) or train.eval_step (--eval; each model put in eval mode once, as
    evaluate() does, so class features are computed once). -> {name: steps/s}."""
    device = flags.chosen_device(args.device)
    precision = train.default_precision(args, device)
    train.seed_everything(0)
    config = clip_model.CONFIGS[args.clip]
    clip = clip_model.build_model(clip_model.random_state_dict(config)).to(device)
    classnames = [f"class {i}" for i in range(args.num_classes)]
    B, R = recipe.batch_size, config.image_resolution
    check_batch_fits(B, R, device)
    images = torch.randint(256, (B, 3, R, R), dtype=torch.uint8)  # as the loaders deliver them
    labels = torch.randint(args.num_classes, (B,))
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    recipe = recipe.for_run(None, "all", classnames)
    try:
        models = {name: model.to(device) for name, model in Method.benchmark_models(clip, classnames, recipe).items()}
    except textrefiner.RecipeError as e:
        raise UserError(flags.recipe_message(e)) from None
    steps = {}
    for name, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        if not args.eval and params:
            model.train()
            optimizer = torch.optim.SGD(params, lr=1e-5, momentum=0.9)
            scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
            steps[name] = lambda m=model, o=optimizer, s=scaler: train.train_step(m, images, labels, o, s, device,
                                                                                  precision)
        elif args.eval:
            model.eval()
            steps[name] = lambda m=model: train.eval_step(m, images, device, precision)
    kind = "inference" if args.eval else "training"
    print(f"bench step: --method {args.method}, {args.clip} random weights, batch {B}, {args.num_classes} classes, "
          f"{device}, {precision}, {kind} steps; {args.steps} rounds after {args.warmup} warm-up, models alternating")
    try:
        medians = time_interleaved(steps, timer=synced_seconds, warmup=args.warmup, rounds=args.steps)
    except torch.OutOfMemoryError as e:
        raise UserError(f"--batch-size {B}: out of memory on {device} ({str(e).splitlines()[0][:200]}); lower "
                        f"--batch-size") from None
    for name, seconds in medians.items():
        print(f"{name:>24s}: {1e3 * seconds:9.2f} ms/step median {B / seconds:9.1f} images/s")
    names = list(steps)
    first, host = names[0], names[1] if len(names) > 1 else None
    for name, reference, target in [(first, host, EVAL_RATE_TARGET if args.eval else TRAIN_STEP_TARGET)] + \
                                   [(first, other, None) for other in names[2:]]:
        if reference is None:
            continue
        if args.eval:  # images/s ratio, at least the target
            what, sign, ratio = "images/s", ">=", medians[reference] / medians[name]
        else:  # step-time ratio, at most the target
            what, sign, ratio = "step time", "<=", medians[name] / medians[reference]
        meets = target is not None and (ratio >= target if args.eval else ratio <= target)
        verdict = "" if target is None else f" ({'meets' if meets else 'MISSES'} the target {sign} {target:.2f})"
        print(f"{name} {what} / {reference} {what}: {ratio:.3f}{verdict}")
    return {name: 1 / seconds for name, seconds in medians.items()}


def check_batch_fits(batch_size, resolution, device):
    """UserError for a --batch-size whose float32 images alone exceed the device's memory (a step needs
    far more): such a batch would end in an allocator's traceback, or in the kernel's OOM killer."""
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    needed = batch_size * 3 * resolution**2 * 4
    if needed > memory:
        raise UserError(f"--batch-size {batch_size}: its {resolution} px images alone take {needed / 2**30:.1f} GiB "
                        f"in float32, more than the {memory / 2**30:.1f} GiB of {device}; lower --batch-size")


class PhaseTimer:
    """Wall seconds per phase of a train.train() run, charged by wrapping from outside what the run
    looks up through its modules: train.setup (start-up), the train loader's batches (data
    loading), train.train_step (compute), train.evaluate (val), train.save_checkpoint
    (checkpointing) and train.final_test (test). A phase ends with a CUDA sync, so asynchronous GPU
    work is charged to the phase that queued it; a call inside a phase (the test's evaluate) is
    charged to that phase."""
    PHASES = dict(setup="start-up", train_step="compute", evaluate="val",
                  save_checkpoint="checkpointing", final_test="test")

    def __init__(self):
        self.seconds, self.phase = collections.defaultdict(float), None  # the phase running

    def timed(self, phase, fn):
        def timed_fn(*args, **kwargs):
            if self.phase is not None:
                return fn(*args, **kwargs)
            self.phase, t0 = phase, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if torch.cuda.is_initialized():
                    torch.cuda.synchronize()
                self.seconds[phase] += time.perf_counter() - t0
                self.phase = None
        return timed_fn

    @contextmanager
    def wrapping(self):
        """The block with train's phases and data.build_train_loader's batches timed."""
        build_train_loader = data.build_train_loader
        wrapped = {(train, name): self.timed(phase, getattr(train, name))
                   for name, phase in self.PHASES.items()}
        wrapped[data, "build_train_loader"] = \
            lambda *args, **kwargs: TimedBatches(build_train_loader(*args, **kwargs), self)
        originals = {(module, name): getattr(module, name) for module, name in wrapped}
        try:
            for (module, name), fn in wrapped.items():
                setattr(module, name, fn)
            yield self
        finally:
            for (module, name), fn in originals.items():
                setattr(module, name, fn)


class TimedBatches:
    """A train loader whose batches (its worker start-up included) are timed as data loading."""

    def __init__(self, loader, timer):
        self.loader, self.next_batch = loader, timer.timed("data loading", next)
        self.start = timer.timed("data loading", iter)

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # set_epoch, ...
        return getattr(self.loader, name)

    def __iter__(self):
        batches = self.start(self.loader)
        while (batch := self.next_batch(batches, None)) is not None:
            yield batch


RUN_PHASES = ("start-up", "data loading", "compute", "val", "checkpointing", "test")


def run(args):
    """train.train() itself (base classes, per-epoch val, best-val test, checkpoints) on a
    synthetic dataset of photo-like 500x375 JPEGs and random --clip weights, its wall time by
    phase, then the train loader alone: loader images/s against model images/s says which bounds a
    run on this machine; on CUDA, the run's val and test images decoded both ways (decode_rates).
    One process. -> {phase: seconds, ...}."""
    if "RANK" in os.environ:
        raise SystemExit("bench.py run times one process; run it with python, not torchrun")
    with tempfile.TemporaryDirectory(prefix="textrefiner-run-") as tmp:
        t0 = time.perf_counter()
        root, weights = os.path.join(tmp, "data"), os.path.join(tmp, "clip.pt")
        data.write_synthetic_dataset(root, args.layout, num_classes=args.num_classes,
                                     images_per_class=args.images, image_size=(500, 375),
                                     natural=True)
        config = clip_model.CONFIGS[args.clip]
        torch.save(clip_model.random_state_dict(config), weights)
        written = time.perf_counter() - t0
        # Imports are part of a user's start-up; this process has them already, so time them apart.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import train"],
                       cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
        imports = time.perf_counter() - t0
        run_args = train.parse_args(["--dataset", args.layout, "--root", root, "--clip", weights,
                                     "--subsample", "base", "--output-dir",
                                     os.path.join(tmp, "run"), *args.train_flags])
        t0 = time.perf_counter()
        with PhaseTimer().wrapping() as timer:
            results = train.train(run_args)
        wall = time.perf_counter() - t0
        splits = data.load_splits(args.layout, root, num_shots=run_args.shots, seed=run_args.seed,
                                  subsample="base")
        batch = min(run_args.batch_size, len(splits["train"]))
        steps_per_epoch = max(1, len(splits["train"]) // run_args.batch_size)
        train_images = run_args.epochs * steps_per_epoch * batch
        loader_rate = loader(args.layout, root, workers=run_args.workers,
                             batch_size=run_args.batch_size, resolution=config.image_resolution,
                             steps=2 * steps_per_epoch, num_shots=run_args.shots)
        device = flags.chosen_device(run_args.device)
        if device.type == "cuda":  # the run's val and test JPEGs decoded both ways
            decode_rates(splits["val"] + splits["test"], config.image_resolution, run_args.workers,
                         device)
    seconds = dict(timer.seconds)
    seconds["other (logging, between phases)"] = wall - sum(seconds.values())
    model_rate = train_images / seconds["compute"]
    cache = "off" if run_args.no_feature_cache else "on"
    print(f"\nwhole run: {args.layout} layout, base classes of {args.num_classes}, "
          f"{len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test "
          f"images (500x375 JPEGs), {args.clip} random weights, {run_args.epochs} epochs, batch "
          f"{run_args.batch_size}, {run_args.precision}, {run_args.workers} workers, feature cache "
          f"{cache}; dataset written in {written:.1f} s (not counted)")
    print(f"{'phase':<34s}{'seconds':>9s}{'share':>8s}")
    for phase in (*RUN_PHASES, "other (logging, between phases)"):
        print(f"{phase:<34s}{seconds.get(phase, 0.0):9.2f}{seconds.get(phase, 0.0) / wall:8.1%}")
    print(f"{'whole run (train())':<34s}{wall:9.2f}{1:8.1%}")
    print(f"{'python imports (timed apart)':<34s}{imports:9.2f}")
    bound = "loader" if loader_rate < model_rate else "model"
    print(f"training images: {train_images}; loader alone {loader_rate:.1f} images/s (decode + "
          f"augment, {run_args.workers} workers) vs model {model_rate:.1f} images/s (training "
          f"steps): the {bound} bounds training on this machine")
    print(f"test accuracy {results['accuracy']:.2f} (random weights: only the pipeline is checked)")
    return dict(seconds, wall=wall, imports=imports, loader_images_per_s=loader_rate,
                model_images_per_s=model_rate)


def table(args):
    """A small base2new table (synthetic datasets x seeds, random --clip weights) run as users run
    it, three ways interleaved (the order rotating per round): as separate processes, one per job
    (what `make base2new` runs); as one `tables.py run` (what `make table` runs: a worker whose jobs
    reuse the imports, the CLIP weights, the CUDA context and the test images' features); and as
    that table with --no-feature-cache (every cache off). Each way's processes count what they do
    (TableCounts). -> {way: median seconds}."""
    datasets = ["caltech101", "dtd", "eurosat", "oxford_pets", "food101", "sun397"][:args.datasets]
    seeds = [str(s) for s in range(1, args.seeds + 1)]
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory(prefix="textrefiner-table-") as tmp:
        root = os.path.join(tmp, "data")
        for dataset in datasets:
            data.write_synthetic_dataset(root, dataset, num_classes=args.num_classes,
                                         images_per_class=args.images, image_size=args.size)
        weights = os.path.join(tmp, "clip.pt")
        torch.save(clip_model.random_state_dict(clip_model.CONFIGS[args.clip]), weights)
        command = [sys.executable, "-c", "import bench; bench.counted_tables()", "run", "base2new",
                   "--method", args.method, "--root", root, "--clip", weights]
        if args.device:
            command += ["--device", args.device]
        flags_of = {"--train-args": [*args.train_flags, "--workers", str(args.workers)],
                    "--eval-args": ["--workers", str(args.workers)]}

        def tables_py(runs, counts, jobs, *more):
            """A `tables.py run` per (datasets, seeds) of jobs; `more` flags for both steps."""
            for some_datasets, some_seeds in jobs:
                steps = [f"{flag}={' '.join([*given, *more])}" for flag, given in flags_of.items()]
                subprocess.run([*command, "--runs", runs, "--datasets", *some_datasets, "--seeds",
                                *some_seeds, *steps], check=True, stdout=subprocess.DEVNULL,
                               cwd=here, env=dict(os.environ, BENCH_COUNTS=counts))

        last, made = {}, itertools.count()  # each way's latest runs folder

        def way(name, *jobs_and_flags):
            def run():
                last[name] = os.path.join(tmp, f"runs-{next(made)}")
                tables_py(last[name], last[name] + ".counts", *jobs_and_flags)
            return run
        one_by_one, together = [([d], [s]) for d in datasets for s in seeds], [(datasets, seeds)]
        ways = {"separate processes": way("separate processes", one_by_one),
                "one table": way("one table", together),
                "one table, no caches": way("one table, no caches", together, "--no-feature-cache")}
        medians = time_interleaved(ways, timer=synced_seconds, warmup=0, rounds=args.rounds)
        counts = {name: TableCounts.read(folder + ".counts") for name, folder in last.items()}
        test_images = {os.path.abspath(i.impath) for d in datasets
                       for i in data.load_splits(d, root, num_shots=0)["test"]}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tables"], cwd=here, check=True)
        imports = time.perf_counter() - t0
        t0 = time.perf_counter()
        clip_model.load_clip(weights)
        clip_load = time.perf_counter() - t0
    jobs = len(datasets) * len(seeds)
    start_up = 2 * imports + clip_load  # every tables.py pays again: its and its worker's imports
    work = max(medians["separate processes"] - jobs * start_up, 0.0)
    print(f"\nbench table of --method {args.method}: {len(datasets)} datasets x {len(seeds)} seeds "
          f"= {jobs} base2new jobs, {args.clip} random weights, {args.num_classes} classes x "
          f"{args.images} images of {args.size} px; {args.rounds} round(s), the ways alternating; "
          f"medians")
    for name, seconds in medians.items():
        print(f"{name:>20s}: {seconds:8.2f} s ({seconds / jobs:.2f} s a job)")
    ratio = medians["one table"] / medians["separate processes"]
    print(f"one table / separate processes: {ratio:.3f}")
    print(f"one table / one table, no caches: "
          f"{medians['one table'] / medians['one table, no caches']:.3f}")
    print(f"a tables.py's start-up: 2 x {imports:.2f} s imports (it and its worker) + "
          f"{clip_load:.2f} s CLIP weights; so the separate processes spent about "
          f"{jobs * start_up:.1f} s starting and {work:.1f} s on the jobs' own work; the table "
          f"spent {medians['one table'] - work:.1f} s besides that work (one start-up, the report, "
          f"what it does not share)")
    TableCounts.show(counts, test_images)
    return medians


def opened_image(event, args):
    """The absolute path of the image file an interpreter "open" audit event opens, else None."""
    if event == "open" and isinstance(args[0], str) and args[0].lower().endswith(IMAGE_SUFFIXES):
        return os.path.abspath(args[0])
    return None


class TableCounts:
    """What a table's workers do, counted from inside them (counted_tables): the image files they
    and the loader processes they fork open (an audit hook on the interpreter's "open" events), the
    images their CLIP image towers take in training and in evaluation, and the wall seconds of
    train.py's phases (PhaseTimer) and of the eval.py steps. Each worker appends to the file
    $BENCH_COUNTS a line per image file opened, and its running totals after each step."""
    def __init__(self, path):
        self.log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self.timer, self.tower = PhaseTimer(), collections.Counter()

    def opened(self, event, args):
        if path := opened_image(event, args):
            os.write(self.log, f"open\t{path}\n".encode())

    def counted(self, clip, images, *args, **kwargs):
        """CLIP.encode_image, its images counted by phase (the training steps' or evaluation)."""
        self.tower["training" if self.timer.phase == "compute" else "evaluation"] += len(images)
        return self.encode_image(clip, images, *args, **kwargs)

    def run_step(self, script, argv, launcher=None):
        try:
            return self.step(script, argv, launcher)
        finally:
            totals = dict(pid=os.getpid(), seconds=self.timer.seconds, tower=self.tower)
            os.write(self.log, f"totals\t{json.dumps(totals)}\n".encode())

    def work(self, *args):
        """tables.table_worker(*args), counted."""
        sys.addaudithook(self.opened)  # for good: an audit hook cannot be removed
        self.encode_image = clip_model.CLIP.encode_image
        clip_model.CLIP.encode_image = lambda clip, *a, **k: self.counted(clip, *a, **k)
        self.step, tables.run_step = tables.run_step, self.run_step
        eval_cli.run = self.timer.timed("eval.py", eval_cli.run)
        with self.timer.wrapping():
            tables_worker(*args)

    @staticmethod
    def read(path):
        """-> (Counter of image opens by path, seconds by phase, tower images by phase)."""
        opens, totals = collections.Counter(), {}
        with open(path) as f:
            for line in f:
                kind, _, value = line.rstrip("\n").partition("\t")
                if kind == "open":
                    opens[value] += 1
                else:
                    totals[json.loads(value)["pid"]] = json.loads(value)
        seconds, tower = collections.Counter(), collections.Counter()
        for process in totals.values():
            seconds.update(process["seconds"])
            tower.update(process["tower"])
        return opens, seconds, tower

    @staticmethod
    def show(counts, test_images):
        """A column per way: image files opened (test, other), tower images, seconds by phase."""
        rows = collections.defaultdict(list)
        for opens, seconds, tower in counts.values():
            for split, files in (("test", test_images),
                                 ("train and val", set(opens) - test_images)):
                n = [opens[f] for f in files]
                rows[f"{split} image files opened"].append(f"{sum(n)} ({max(n, default=0)}/file)")
            for phase in ("training", "evaluation"):
                rows[f"image tower images, {phase}"].append(str(tower[phase]))
            for phase in (*RUN_PHASES, "eval.py"):
                rows[f"seconds: {phase}"].append(f"{seconds[phase]:.2f}")
        width = max(map(len, counts)) + 2
        heading = "".join(f"{way:>{width}s}" for way in counts)
        print(f"\n{'counted in the workers (last round)':<34s}{heading}")
        for row, cells in rows.items():
            print(f"{row:<34s}" + "".join(f"{c:>{width}s}" for c in cells))


def counted_tables():
    """`python -c "import bench; bench.counted_tables()" ARGS`: tables.main(ARGS), its workers
    counted (TableCounts) into the file $BENCH_COUNTS."""
    tables.table_worker = counted_table_worker
    tables.main(sys.argv[1:])


def counted_table_worker(*args):
    TableCounts(os.environ["BENCH_COUNTS"]).work(*args)


def decode_rates(items, resolution, workers, device, batch_size=100, rounds=3):
    """Evaluation images/s through the evaluation loader, decoded and preprocessed with PIL in
    `workers` loader workers and with decode_jpeg on `device` in batches (data.DecodedOn; the
    loader workers read the files), the two alternating; medians. -> {way: images/s}."""
    ways = {name: data.build_eval_loader(items, batch_size, resolution, workers=workers,
                                         decode_on=on)
            for name, on in (("PIL in the loader workers", None),
                             (f"decode_jpeg on {device}", device))}
    passes = {name: (lambda loader=loader: sum(1 for _ in loader)) for name, loader in ways.items()}
    medians = time_interleaved(passes, timer=synced_seconds, warmup=1, rounds=rounds)
    rates = {name: len(items) / seconds for name, seconds in medians.items()}
    for name, rate in rates.items():
        print(f"{name:>28s}: {rate:9.1f} images/s")
    pil, decoded = rates.values()
    print(f"decode_jpeg on {device} / PIL: {decoded / pil:.2f}x ({len(items)} images, {workers} "
          f"loader workers, batch {batch_size}, {resolution} px)")
    return rates


def decode(args):
    """decode_rates on a dataset's test split (--device, default cuda when available)."""
    device = flags.chosen_device(args.device)
    if device.type != "cuda":
        print("no CUDA device: decode_jpeg runs on the CPU here (the GPU decode is not measured)")
    items = data.load_splits(args.dataset, args.root, num_shots=0)["test"]
    return decode_rates(items, args.resolution, args.workers, device, args.batch_size, args.rounds)


def loader(dataset, root, workers=4, batch_size=64, resolution=224, steps=50, num_shots=-1):
    """Decoded + augmented images/s of the train loader (the test split of a test-only dataset)."""
    splits = data.load_splits(dataset, root, num_shots=num_shots, seed=1)
    items = splits["train"] or splits["test"]
    batches = data.build_train_loader(items, min(batch_size, len(items)), resolution, seed=1,
                                      workers=workers)
    images, start, epoch = 0, None, 0
    while steps > 0:
        batches.set_epoch(epoch)
        for batch, _ in batches:
            if start is None:  # the first batch pays for worker start-up
                start = time.perf_counter()
            else:
                images, steps = images + len(batch), steps - 1
            if steps == 0:
                break
        epoch += 1
    rate = images / (time.perf_counter() - start)
    print(f"{dataset}: {rate:.1f} images/s decoded+augmented ({images} images, {len(items)} in "
          f"split, workers={workers}, batch={batch_size}, resolution={resolution})")
    return rate


def synthetic(args):
    """A synthetic CoOp-layout dataset and random CLIP weights under args.out (the demos, tests);
    with --teacher, a PromptKD teacher file of the base classes in the released folder layout, on
    a wider random CLIP (teacher-clip.pt)."""
    root = os.path.join(args.out, "data")
    for dataset in args.dataset:
        try:
            data.write_synthetic_dataset(root, dataset, num_classes=args.classes,
                                         images_per_class=args.images, image_size=args.size)
        except ValueError as e:  # too few images for the layout's splits
            raise UserError(f"--images {args.images} for {dataset}: {e}") from None
    weights = clip_model.random_state_dict(clip_model.CONFIGS[args.clip])
    torch.save(weights, os.path.join(args.out, "clip.pt"))
    if args.teacher:
        teacher = clip_model.random_state_dict(clip_model.CONFIGS["tiny-teacher"], seed=1)
        torch.save(teacher, os.path.join(args.out, "teacher-clip.pt"))
        for dataset in args.dataset:
            base = data.load_splits(dataset, root, subsample="base")["classnames"]
            path = os.path.join(args.out, "teachers", released.TEACHER_FOLDERS[dataset][0],
                                released.BASE2NEW_TEACHER)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            released.write_teacher_checkpoint(path, teacher, base, depth=args.teacher_depth)
    print(f"wrote {', '.join(args.dataset)} under {root} and random {args.clip} weights {args.out}/clip.pt")


def get_parser(Method=None, spec="coop"):
    """bench.py's commands; with Method, step takes its recipe's flags."""
    positive, non_negative = flags.ranged(int, POSITIVE), flags.ranged(int, NON_NEGATIVE)
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("step", help="training (or --eval) steps of a method with and without TextRefiner")
    s.add_argument("--method", default="coop", help="as train.py's --method")
    s.add_argument("--clip", default="ViT-B/16", choices=tuple(clip_model.CONFIGS), help="random weights of this size")
    s.add_argument("--eval", action="store_true", help="inference instead of training steps")
    s.add_argument("--num-classes", type=positive, default=100)
    s.add_argument("--steps", type=positive, default=20, help="timed rounds")
    s.add_argument("--warmup", type=non_negative, default=3, help="untimed rounds before those")
    s.add_argument("--device", type=flags.device_flag, help="cuda, cuda:N or cpu (default: cuda when available)")
    s.add_argument("--precision", choices=("bf16", "fp16", "fp32"))
    if Method is not None:  # its recipe (--batch-size, --depth, --teacher-clip as a size name, ...)
        flags.add_recipe_flags(s, Method, spec)
    r = sub.add_parser("run", help="a whole train.py run on synthetic JPEGs; unknown flags go to "
                                   "train.py")
    r.add_argument("--clip", default="ViT-B/16", choices=tuple(clip_model.CONFIGS))
    r.add_argument("--num-classes", type=positive, default=20)
    r.add_argument("--images", type=int, default=40,
                   help="per class: a quarter test, a quarter val, the rest train")
    r.add_argument("--layout", default="caltech101", choices=("caltech101", "imagenet"),
                   help="imagenet's val split is its test split")
    lo = sub.add_parser("loader", help="decoded + augmented images/s of a dataset's train loader")
    lo.add_argument("--dataset", required=True, choices=tuple(data.DATASETS))
    lo.add_argument("--root", default="data")
    lo.add_argument("--workers", type=non_negative, default=4)
    lo.add_argument("--batch-size", type=positive, default=64)
    lo.add_argument("--resolution", type=positive, default=224)
    lo.add_argument("--steps", type=positive, default=50)
    lo.add_argument("--shots", type=int, default=-1,
                    help="few-shot train set to read (-1: whole split)")
    de = sub.add_parser("decode", help="evaluation images/s: PIL in the loader workers vs "
                                       "decode_jpeg on the GPU in batches")
    de.add_argument("--dataset", required=True, choices=tuple(data.DATASETS))
    de.add_argument("--root", default="data")
    de.add_argument("--workers", type=non_negative, default=8)
    de.add_argument("--batch-size", type=positive, default=100)
    de.add_argument("--resolution", type=positive, default=224)
    de.add_argument("--rounds", type=positive, default=3)
    de.add_argument("--device", type=flags.device_flag, help="default: cuda when available")
    ta = sub.add_parser("table", help="a small base2new table as separate processes, as one "
                                      "tables.py run and as one without caches; unknown flags go "
                                      "to train.py")
    ta.add_argument("--method", default="coop", help="as tables.py's --method (a built-in name, "
                                                     "MODULE:CLASS or FILE.py:CLASS)")
    ta.add_argument("--clip", default="ViT-B/16", choices=tuple(clip_model.CONFIGS))
    ta.add_argument("--datasets", type=flags.ranged(int, Range(lambda v: 1 <= v <= 6, "in 1..6")), default=3,
                    help="synthetic datasets (at most 6)")
    ta.add_argument("--seeds", type=positive, default=2)
    ta.add_argument("--rounds", type=positive, default=2, help="each way, alternating")
    ta.add_argument("--num-classes", type=positive, default=10)
    ta.add_argument("--images", type=flags.ranged(int, Range(lambda v: v >= 3, "at least 3")),
                    default=32, help="per class: a test, a val and a train image at least")
    ta.add_argument("--size", type=positive, default=224, help="image side in pixels")
    ta.add_argument("--workers", type=non_negative, default=4, help="loader workers")
    ta.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    sy = sub.add_parser("synthetic",
                        help="a synthetic dataset and random CLIP weights (and a teacher file)")
    sy.add_argument("out")
    sy.add_argument("--dataset", nargs="+", default=["caltech101"], choices=tuple(data.DATASETS))
    sy.add_argument("--classes", type=positive, default=10)
    sy.add_argument("--images", type=positive, default=32, help="per class")
    sy.add_argument("--size", type=positive, default=32, help="image side in pixels")
    sy.add_argument("--clip", default="tiny", choices=tuple(clip_model.CONFIGS))
    sy.add_argument("--teacher", action="store_true",
                    help="also a PromptKD teacher per dataset (tiny-teacher CLIP)")
    teacher = clip_model.CONFIGS["tiny-teacher"]
    deepest = min(teacher.vision_layers, teacher.transformer_layers)
    sy.add_argument("--teacher-depth", default=2, type=flags.ranged(
        int, Range(lambda v: 1 <= v <= deepest, f"in 1..{deepest} (the teacher CLIP's blocks)")))
    return p


def _main(argv):
    argv = sys.argv[1:] if argv is None else argv
    spec = flags.method_spec(argv) if argv[:1] == ["step"] else "coop"
    Method = flags.load_method(spec) if argv[:1] == ["step"] else None
    p = get_parser(Method, spec)
    args, rest = p.parse_known_args(argv)
    if args.command == "run":
        args.train_flags = rest
        fewest = 2 if args.layout == "imagenet" else 3  # a test (and a val) image, one to train
        if args.images < fewest:
            p.error(f"--images must be at least {fewest}, got {args.images}")
        # train.py's own checks, before the dataset is written
        train.parse_args(["--dataset", args.layout, "--root", ".", "--output-dir",
                          tempfile.gettempdir(), *rest])
        return run(args)
    if args.command == "table":
        args.train_flags = rest
        return table(args)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "step":
        return step(args, Method, flags.fill_recipe(p, args, Method, require=False))
    if args.command == "decode":
        return decode(args)
    if args.command == "loader":
        return loader(args.dataset, args.root, workers=args.workers, batch_size=args.batch_size,
                      resolution=args.resolution, steps=args.steps, num_shots=args.shots)
    return synthetic(args)


def main(argv=None):
    with train.command_line():
        return _main(argv)


if __name__ == "__main__":
    main()
