"""tables.py (make table / base2new / xd): the jobs of a table run back to back in one worker or over
several slots with the same results as separate make base2new runs, resumably, each job's failure
isolated; and the checks that keep a table from mixing models: new/ evaluated from the model its
base/ tested, the report's pairing, evaluations that cannot lose or overwrite results."""
import collections
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import data
import eval as evaluate_cli
import helpers
import report
import tables
import train
from helpers import REPO, assert_usage_error, read_results, write_lock

DATASETS, SEEDS = ("caltech101", "dtd", "eurosat"), ("1", "2")
TRAIN = "--epochs 2 --batch-size 4 --workers 0 --device cpu"
EVAL = "--workers 0 --device cpu"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Three synthetic datasets of 6 classes and a tiny CLIP: (data root, weights)."""
    base = tmp_path_factory.mktemp("tables")
    subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "synthetic", str(base), "--dataset", *DATASETS,
                    "--classes", "6", "--images", "12"], check=True, capture_output=True)
    return str(base / "data"), str(base / "clip.pt")


def table_argv(root, runs, *extra, command="run"):
    data_root, weights = root
    return [command, "base2new", "--root", data_root, "--clip", weights, "--runs", str(runs), "--datasets",
            *DATASETS, "--seeds", *SEEDS, f"--train-args={TRAIN}", f"--eval-args={EVAL}", *extra]


def make(target, root, output, *variables):
    data_root, weights = root
    return subprocess.run(["make", "--no-print-directory", "-C", REPO, target, f"DATA={data_root}", f"CLIP={weights}",
                           f"OUTPUT={output}", f"PYTHON={sys.executable}", f"TRAIN_ARGS={TRAIN}", f"EVAL_ARGS={EVAL}",
                           *variables], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def files(folder):
    """{path: (size, mtime)} of every file under folder."""
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, names in os.walk(folder) for f in names}


SAME = ("accuracy", "macro_f1", "per_class_accuracy", "classnames", "num_images", "epoch", "selection", "method")


# What a checkpoint holds besides the flags (args) and the log line (its seconds)
CHECKPOINT = ("model", "optimizer", "scaler", "epoch", "selection", "rng", "best", "best_model")


def assert_same_runs(a, b, jobs):
    """The results of every job's steps, and the checkpoints' tensors and states bitwise, are the
    same under a and b."""
    for dataset, seed in jobs:
        for part in ("base", "new"):
            ra = read_results(os.path.join(a, "base2new", dataset, f"seed{seed}", part))
            rb = read_results(os.path.join(b, "base2new", dataset, f"seed{seed}", part))
            assert {k: ra.get(k) for k in SAME} == {k: rb.get(k) for k in SAME}, (dataset, seed, part)
        for name in ("last.pt", "best.pt"):
            ca, cb = (torch.load(os.path.join(x, "base2new", dataset, f"seed{seed}", "base", name),
                                 weights_only=True) for x in (a, b))
            assert_same_state({k: ca[k] for k in CHECKPOINT}, {k: cb[k] for k in CHECKPOINT},
                              (dataset, seed, name))


def assert_same_state(a, b, where):
    """Nested dicts, lists and tensors equal, the tensors bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, (dict, list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        keys = a.keys() if isinstance(a, dict) else range(len(a))
        assert all(k in b for k in keys) if isinstance(a, dict) else True, where
        for k in keys:
            assert_same_state(a[k], b[k], (*where, k))
    else:
        assert a == b, (where, a, b)


@pytest.mark.slow
def test_make_table_equals_separate_make_base2new_runs_and_resumes(root, tmp_path):
    table = make("table", root, tmp_path / "table", f"DATASETS={' '.join(DATASETS)}", f"SEEDS={' '.join(SEEDS)}")
    assert table.returncode == 0, table.stdout[-3000:] + table.stderr[-3000:]
    out = table.stdout
    assert "6 job(s), 0 finished already, 6 to run on 1 slot(s)" in out and "[6/6 jobs]" in out and "ETA" in out
    assert "base2new dtd seed 2: base " in out and " new " in out and "images/s" in out
    assert "CoOp + TextRefiner: base-to-new generalisation" in out and "Average (3/11)" in out  # then the report
    # the same jobs as separate processes, two at a time
    procs = [subprocess.Popen(["make", "--no-print-directory", "-C", REPO, "base2new", f"DATASET={d}", f"SEED={s}",
                               f"DATA={root[0]}", f"CLIP={root[1]}", f"OUTPUT={tmp_path / 'loop'}",
                               f"PYTHON={sys.executable}", f"TRAIN_ARGS={TRAIN}", f"EVAL_ARGS={EVAL}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
             for d in DATASETS for s in SEEDS]
    for i in range(0, len(procs), 2):
        assert all(p.wait(timeout=600) == 0 for p in procs[i:i + 2])
    assert_same_runs(str(tmp_path / "table" / "coop"), str(tmp_path / "loop" / "coop"),
                     [(d, s) for d in DATASETS for s in SEEDS])
    before = files(tmp_path / "table")
    again = make("table", root, tmp_path / "table", f"DATASETS={' '.join(DATASETS)}", f"SEEDS={' '.join(SEEDS)}")
    assert again.returncode == 0 and "6 finished already, 0 to run" in again.stdout, again.stdout
    assert files(tmp_path / "table") == before  # nothing written, the report included


@pytest.mark.slow
def test_two_slots_run_jobs_at_once_and_a_broken_dataset_fails_alone(root, tmp_path, capsys):
    """Two CPU workers (standing in for two GPUs) share the queue; dtd's split file is gone: its jobs
    fail with the one-line error naming it, the others finish, the table exits non-zero listing them."""
    data_root = tmp_path / "data"
    shutil.copytree(root[0], data_root, symlinks=True)
    os.remove(data_root / "dtd" / "split_zhou_DescribableTextures.json")
    with pytest.raises(SystemExit) as err:
        tables.main(table_argv((str(data_root), root[1]), tmp_path / "runs", "--device", "cpu", "--gpus", "2"))
    assert err.value.code == 1
    captured = capsys.readouterr()
    assert "2 job(s) failed:" in captured.err
    for seed in SEEDS:
        assert f"base2new dtd seed {seed}: " in captured.err and "split_zhou_DescribableTextures.json" in captured.err
    assert "on 2 slot(s) (cpu, cpu)" in captured.out and "[6/6 jobs]" in captured.out
    runs = str(tmp_path / "runs")
    for dataset in ("caltech101", "eurosat"):
        for seed in SEEDS:
            folder = os.path.join(runs, "base2new", dataset, f"seed{seed}")
            assert sorted(os.listdir(folder)) == ["base", "new"]  # each job in its own folder, complete
            assert read_results(os.path.join(folder, "new"))["checkpoint"] == os.path.join(folder, "base", "best.pt")
    assert not os.path.exists(os.path.join(runs, "base2new", "dtd", "seed1", "base", "last.pt"))


def test_list_jobs_and_one_job_by_index(root, tmp_path, capsys):
    jobs = tables.main(table_argv(root, tmp_path, command="jobs"))
    lines = capsys.readouterr().out.splitlines()
    assert len(jobs) == 6 and lines[0] == "0\tbase2new caltech101 seed 1\tto run" and lines[5].startswith("5\t")
    tables.main(table_argv(root, tmp_path, "--job", "3"))  # dtd seed 2 only, as a SLURM array task would
    assert sorted(os.listdir(tmp_path / "base2new")) == ["dtd", "report.json"]
    assert os.listdir(tmp_path / "base2new" / "dtd") == ["seed2"]
    tables.main(table_argv(root, tmp_path, command="jobs"))
    assert "3\tbase2new dtd seed 2\tfinished" in capsys.readouterr().out
    assert_usage_error(tables.main, table_argv(root, tmp_path, "--job", "6"), "--job 6: the table has jobs 0..5",
                       capsys)


def test_xd_jobs_follow_the_method():
    """A transductive method trains a model per target; the others one ImageNet model per seed."""
    args = tables.get_parser().parse_args(["jobs", "xd", "--root", ".", "--runs", ".", "--datasets", "dtd", "eurosat",
                                           "--seeds", "1", "2"])
    args.method = "coop"
    assert [str(j) for j in tables.table_jobs(args)] == ["xd imagenet seed 1", "xd imagenet seed 2"]
    assert tables.table_jobs(args)[0].targets == ("dtd", "eurosat")
    args.method = "promptkd"
    assert [str(j) for j in tables.table_jobs(args)] == ["xd dtd seed 1", "xd dtd seed 2", "xd eurosat seed 1",
                                                         "xd eurosat seed 2"]


# ----------------------------------------------------------------------------- tables that cannot mix models

def dtd_jobs(root, runs, seeds=("1",), *train_args):
    """The table's dtd jobs, each through tables.run_job in this process (what a table's worker runs
    for a job: the tests here are about which steps run, not about the worker pool)."""
    data_root, weights = root
    p = tables.get_parser()
    args = p.parse_args(["run", "base2new", "--root", data_root, "--clip", weights, "--runs", str(runs),
                         "--datasets", "dtd", "--seeds", *seeds, f"--train-args={TRAIN} {' '.join(train_args)}",
                         f"--eval-args={EVAL}"])
    tables.check_table_args(p, args)
    for job in tables.table_jobs(args):
        tables.run_job(job, args, run_step=tables.run_step)


def test_new_is_evaluated_again_when_base_is_another_model(root, tmp_path, capfd):
    dtd_jobs(root, tmp_path)
    run = tmp_path / "base2new" / "dtd" / "seed1"
    first = read_results(run / "new")
    assert first["checkpoint_sha256"] == read_results(run / "base")["checkpoint_sha256"]
    shutil.rmtree(run / "base")
    capfd.readouterr()
    dtd_jobs(root, tmp_path, ("1",), "--lr", "0.05")  # base trained again, with other flags
    out = capfd.readouterr().out
    assert "test (base): accuracy" in out
    assert f"skip: {run / 'new'} is finished" not in out  # new/ of the old model is not "finished"
    second = read_results(run / "new")
    assert second["checkpoint_sha256"] == read_results(run / "base")["checkpoint_sha256"] != first["checkpoint_sha256"]


def test_report_refuses_pairs_of_other_models_and_impossible_accuracies(root, tmp_path, capsys):
    dtd_jobs(root, tmp_path, ("1", "2"))
    b2n = tmp_path / "base2new"
    report.report_folder(str(b2n))  # sound

    def edit(path, **changes):
        result = read_results(path)
        with open(os.path.join(path, "results.json"), "w") as f:
            json.dump(dict(result, **changes), f)
        return result

    cases = {  # (folder, changes) -> the problem reported
        "new/results.json: evaluated from another model than": (b2n / "dtd" / "seed1" / "new", dict(
            checkpoint_sha256=read_results(b2n / "dtd" / "seed2" / "base")["checkpoint_sha256"])),  # seed 2's model
        "its method differs": (b2n / "dtd" / "seed1" / "new", dict(method="promptkd")),  # a PromptKD student's new/
        "a run of seed 2 in the folder of seed 1": (b2n / "dtd" / "seed1" / "new",
                                                    dict(args=dict(read_results(b2n / "dtd" / "seed2" / "new")["args"]))),
        "accuracy is 250, expected a number": (b2n / "dtd" / "seed1" / "base", dict(accuracy=250)),
        "accuracy is 0.705, expected a number: a percentage in [0, 100] of its 9 images": (
            b2n / "dtd" / "seed1" / "base", dict(accuracy=0.705)),
    }
    for message, (folder, changes) in cases.items():
        original = edit(folder, **changes)
        with pytest.raises(SystemExit):
            tables.main(["report", str(b2n)])
        assert message in capsys.readouterr().err, message
        with open(os.path.join(folder, "results.json"), "w") as f:
            json.dump(original, f)


def test_evaluations_cannot_lose_or_overwrite_results(run, tmp_path, capsys, monkeypatch):
    root, weights, out = run
    best = os.path.join(out, "best.pt")
    common = ["--workers", "0", "--device", "cpu"]
    # a run holds the folder: an evaluation into it is refused before anything is written
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(tmp_path / "held")
        write_lock(tmp_path / "held", host=socket.gethostname(), pid=holder.pid)
        assert_usage_error(evaluate_cli.main, ["--checkpoint", best, *common, "--subsample", "new", "--output-dir",
                                               str(tmp_path / "held")], "is in use by another run", capsys)
    finally:
        holder.kill()
        holder.wait()
    assert os.listdir(tmp_path / "held") == [".lock"]
    # base and new into one folder: the second is another evaluation
    evaluate_cli.main(["--checkpoint", best, *common, "--output-dir", str(tmp_path / "one")])
    assert_usage_error(evaluate_cli.main, ["--checkpoint", best, *common, "--subsample", "new", "--output-dir",
                                           str(tmp_path / "one")], "holds the results of another evaluation", capsys)
    # a training into an evaluation's folder does not replace its results
    before = read_results(tmp_path / "one")
    argv = ["--dataset", "caltech101", "--root", root, "--clip", weights, "--subsample", "base", *common,
            "--epochs", "1", "--warmup-epochs", "0", "--output-dir", str(tmp_path / "one")]
    assert_usage_error(train.main, argv, "holds the results of another run", capsys)
    assert read_results(tmp_path / "one") == before and not os.path.exists(tmp_path / "one" / "last.pt")
    # the same evaluation, typed with a relative path from two directories, is the same evaluation
    monkeypatch.chdir(os.path.dirname(out))
    relative = os.path.join(os.path.basename(out), "best.pt")
    evaluate_cli.main(["--checkpoint", relative, *common, "--output-dir", str(tmp_path / "rel")])
    monkeypatch.chdir(tmp_path)
    evaluate_cli.main(["--checkpoint", best, *common, "--output-dir", str(tmp_path / "rel")])
    assert read_results(tmp_path / "rel")["checkpoint"] == os.path.realpath(best)


def test_a_slot_reads_each_file_once_and_a_launcher_runs_steps_as_commands(root, tmp_path, monkeypatch, capsys):
    """One slot, two jobs (seeds) in its worker process, with a loader worker: the CLIP file is read
    once for all four steps, every test image file is opened once (the worker keeps the tower's
    features) and each training and val image once per seed that picks it (counted by the
    interpreter's audit events in the worker and its loader processes). With --launcher every step
    is a command of its own instead, here with --no-feature-cache: the same results and checkpoints
    bitwise (a failing step fails its job: exit status 1)."""
    monkeypatch.setattr(tables, "table_worker", helpers.table_worker_counting_reads)
    monkeypatch.setenv("CLIP_READS", str(tmp_path / "reads"))
    monkeypatch.setenv("BENCH_COUNTS", str(tmp_path / "opens"))
    one_loader_worker = [f"--train-args={TRAIN} --workers 1", f"--eval-args={EVAL} --workers 1"]
    store = ["--feature-store", str(tmp_path / "store")]
    argv = [*table_argv(root, tmp_path / "kept"), *one_loader_worker, *store]
    argv[argv.index("--datasets") + 1:argv.index("--seeds")] = ["dtd"]
    tables.main(argv)
    reads = (tmp_path / "reads").read_text().splitlines()
    assert reads == [root[1]] and len(os.listdir(tmp_path / "kept" / "base2new" / "dtd")) == 2
    assert os.listdir(tmp_path / "store") and all(n.endswith(".pt") for n in os.listdir(tmp_path / "store"))
    opens = helpers.opened_images(tmp_path / "opens")
    test = [os.path.abspath(i.impath) for i in data.load_splits("dtd", root[0], num_shots=0)["test"]]
    picks = {split: collections.Counter(os.path.abspath(i.impath) for seed in SEEDS
                                        for i in data.load_splits("dtd", root[0], 16, int(seed), "base")[split])
             for split in ("train", "val")}
    assert set(opens) == set(test) | set(picks["train"]) | set(picks["val"])
    assert all(opens[f] == 1 for f in test) and all(opens[f] == n for f, n in picks["train"].items())
    assert all(opens[f] <= n for f, n in picks["val"].items())  # the same val pass: served again
    monkeypatch.undo()
    no_cache = [f"{flags} --no-feature-cache" for flags in one_loader_worker]
    launched = table_argv(root, tmp_path / "launched", *no_cache, "--launcher", sys.executable)
    launched[launched.index("--datasets") + 1:launched.index("--seeds")] = ["dtd"]
    launched[launched.index("--seeds") + 1:launched.index("--seeds") + 3] = ["1"]
    tables.main(launched)
    assert_same_runs(str(tmp_path / "kept"), str(tmp_path / "launched"), [("dtd", "1")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        tables.main([*launched[:-2], "--runs", str(tmp_path / "failed"), "--launcher", "false"])
    assert err.value.code == 1 and "1 job(s) failed:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the few-shot table

def test_fewshot_table_trains_k_shots_of_every_class_and_tests_every_class(root, tmp_path, capsys):
    """make table-fewshot's command, then its 8 jobs (2 datasets x 1, 2 shots x 2 seeds): each trained on
    K images of every class with CoOp's few-shot recipe and tested on the whole test split; then listed
    as finished. The test split is read from the split file itself."""
    dry = subprocess.run(["make", "-n", "--no-print-directory", "-C", REPO, "table-fewshot", "DATASETS=caltech101 dtd",
                          "SEEDS=1 2", "SHOTS=1 2", "DATA=d", "OUTPUT=o"], capture_output=True, text=True, timeout=60)
    command = " ".join(dry.stdout.split())
    assert "tables.py run fewshot --method coop --root d --clip ViT-B/16 --runs o/coop" in command, command
    assert "--datasets caltech101 dtd --seeds 1 2 --jobs-per-gpu 1 --shots 1 2" in command, command
    data_root, weights = root
    argv = ["fewshot", "--root", data_root, "--clip", weights, "--runs", str(tmp_path), "--datasets", "caltech101",
            "dtd", "--seeds", "1", "2", "--shots", "1", "2",
            "--train-args=--epochs 1 --warmup-epochs 0 --batch-size 4 --workers 0 --device cpu"]
    tables.main(["run", *argv])
    out = capsys.readouterr().out
    assert "8 job(s), 0 finished already, 8 to run" in out and "[8/8 jobs]" in out and "few-shot accuracy" in out
    splits = {"caltech101": "caltech-101/split_zhou_Caltech101.json", "dtd": "dtd/split_zhou_DescribableTextures.json"}
    for dataset, split in splits.items():
        with open(os.path.join(data_root, split)) as f:
            test = json.load(f)["test"]
        classes = len({label for _, label, _ in test})
        for shots in (1, 2):
            for seed in (1, 2):
                r = read_results(tmp_path / "fewshot" / dataset / f"shots{shots}" / f"seed{seed}")
                assert (r["dataset"], r["subsample"], r["shots"], r["args"]["seed"]) == (dataset, "all", shots, seed)
                assert (r["num_classes"], r["num_images"], r["train_classes"]) == (classes, len(test), classes)
                assert r["train_images"] == shots * classes and None not in r["per_class_accuracy"]
                # CoOp's few-shot recipe (16 random context vectors, the last epoch), --train-args' epochs
                assert (r["args"]["n_ctx"], r["args"]["ctx_init"], r["selection"], r["args"]["epochs"]) == (
                    16, "", "last", 1)
                assert r["title"] == "CoOp" and r["method"] == "coop" and r["args"]["few_shot"]
    jobs = tables.main(["jobs", *argv])
    lines = capsys.readouterr().out.splitlines()
    assert len(jobs) == 8 and lines[0] == "0\tfewshot caltech101 shots 1 seed 1\tfinished"
    assert all(line.endswith("\tfinished") for line in lines)
    assert_usage_error(tables.main, ["jobs", "base2new", *argv[1:]], "--shots is for the fewshot protocol", capsys)


@pytest.mark.parametrize("option, words, message", [
    ("--train-args", "--seed 5", "--train-args --seed: defines the job, which tables.py sets for each job: give "
                                 "tables.py --seeds instead"),
    ("--train-args", "--method kgcoop", "--train-args --method: defines the job"),
    ("--train-args", "--no-refiner", "--train-args --no-refiner: defines the job"),
    ("--train-args", "--refiner", "give tables.py --no-refiner instead"),
    ("--train-args", "--dataset=dtd", "give tables.py --datasets instead"),
    ("--train-args", "--output-dir x", "give tables.py --runs instead"),
    ("--train-args", "--clip x.pt", "give tables.py --clip instead"),
    ("--train-args", "--subsample all", "--train-args --subsample: defines the job, which tables.py sets for each "
                                        "job (by its protocol)"),
    ("--train-args", "--shots 4", "--train-args --shots: defines the job"),
    ("--train-args", "--xd", "--train-args --xd: defines the job"),
    ("--train-args", "--resume", "--train-args --resume: defines the job"),
    ("--eval-args", "--subsample base", "--eval-args --subsample: defines the job"),
    ("--eval-args", "--seed 2", "--eval-args --seed: defines the job"),
    ("--eval-args", "--checkpoint=x.pt", "--eval-args --checkpoint: defines the job"),
    ("--eval-args", "--split val", "--eval-args --split: defines the job"),
    ("--eval-args", "--teacher t", "--eval-args --teacher: defines the job, which tables.py sets for each job: give "
                                   "tables.py --teacher instead"),
    ("--eval-args", "--allow-other-clip", "--eval-args --allow-other-clip: defines the job"),
    ("--train-args", "--ctx-init 'a photo", "--train-args \"--ctx-init 'a photo\": No closing quotation"),
    ("--train-args", "--epochs 0", "--train-args: train.py: argument --epochs: must be positive, got 0"),
    ("--train-args", "--kd-weight 3", "--train-args: train.py: --kd-weight applies to --method promptkd, not coop"),
    ("--eval-args", "--batch-size 0", "--eval-args: eval.py: argument --batch-size: must be positive, got 0"),
])
def test_pass_through_flags_cannot_redefine_the_job_and_are_checked_at_start(option, words, message, run, tmp_path,
                                                                             capsys):
    """--seed 5 trained seed 5 into seed 1's folder, --method kgcoop filled the coop folder, --subsample base
    put a base evaluation in new/ (each exit 0); an unclosed quote was a traceback, a value error the
    failure of every job."""
    root, weights, _ = run
    argv = ["jobs", "base2new", "--root", root, "--clip", weights, "--runs", str(tmp_path), "--datasets", "caltech101",
            "--seeds", "1", f"{option}={words}"]
    assert_usage_error(tables.main, argv, message, capsys)


def test_a_step_refusing_its_flags_fails_in_one_line_naming_the_script(run, capsys):
    root, _, _ = run
    with pytest.raises(data.UserError, match=r"^train.py: argument --epochs: must be positive, got 0$"):
        tables.run_step("train.py", ["--dataset", "caltech101", "--root", root, "--epochs", "0", "--output-dir", "x"])
    with pytest.raises(data.UserError, match=r"^eval.py: argument --batch-size: must be positive, got 0$"):
        tables.run_step("eval.py", ["--zeroshot", "--batch-size", "0"])
    assert capsys.readouterr().err == ""  # no usage text


def test_a_moved_table_evaluates_new_from_the_checkpoint_where_it_is_now(run, tmp_path):
    """A base/ trained elsewhere (its results.json names a checkpoint path that is gone) and moved into
    the table: new/ is evaluated from base/'s checkpoint where it is now, and the report pairs them."""
    root, weights, out = run
    base = tmp_path / "runs" / "base2new" / "caltech101" / "seed1" / "base"
    shutil.copytree(out, base)
    trained = read_results(base)
    with open(base / "results.json", "w") as f:
        json.dump(dict(trained, checkpoint="/gone/base/best.pt"), f)
    p = tables.get_parser()
    args = p.parse_args(["run", "base2new", "--root", root, "--clip", weights, "--runs", str(tmp_path / "runs"),
                         "--datasets", "caltech101", "--seeds", "1", "--eval-args=--workers 0 --device cpu"])
    tables.check_table_args(p, args)
    steps = []

    def recorded(script, argv):
        steps.append((script, argv))
        tables.run_step(script, argv)
    done = tables.run_job(tables.table_jobs(args)[0], args, run_step=recorded)
    assert [script for script, _ in steps] == ["eval.py"]
    assert steps[0][1][steps[0][1].index("--checkpoint") + 1] == str(base / "best.pt")
    assert done["new"]["checkpoint_sha256"] == trained["checkpoint_sha256"]
    assert report.report_folder(str(tmp_path / "runs" / "base2new"))["datasets"]["caltech101"]["seeds"] == [1]


def test_more_gpus_than_the_machine_has_are_refused_at_start(run, tmp_path, monkeypatch, capsys):
    root, weights, _ = run
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv = ["run", "base2new", "--root", root, "--clip", weights, "--runs", str(tmp_path), "--datasets", "caltech101",
            "--seeds", "1", "--gpus", "2", "--job", "7"]
    assert_usage_error(tables.main, argv, "--gpus 2: this machine has 1 visible CUDA device(s)", capsys)
