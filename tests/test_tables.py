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

def one_job(root, runs, seed="1", *train_args):
    data_root, weights = root
    return tables.main(["run", "base2new", "--root", data_root, "--clip", weights, "--runs", str(runs),
                        "--datasets", "dtd", "--seeds", seed, f"--train-args={TRAIN} {' '.join(train_args)}",
                        f"--eval-args={EVAL}"])


def test_new_is_evaluated_again_when_base_is_another_model(root, tmp_path, capfd):
    """(capfd: the steps run, and print, in the table's worker process.)"""
    one_job(root, tmp_path)
    run = tmp_path / "base2new" / "dtd" / "seed1"
    first = read_results(run / "new")
    assert first["checkpoint_sha256"] == read_results(run / "base")["checkpoint_sha256"]
    shutil.rmtree(run / "base")
    capfd.readouterr()
    one_job(root, tmp_path, "1", "--lr", "0.05")  # base trained again, with other flags
    out = capfd.readouterr().out
    assert "test (base): accuracy" in out  # the worker's output reaches capfd
    assert f"skip: {run / 'new'} is finished" not in out  # new/ of the old model is not "finished"
    second = read_results(run / "new")
    assert second["checkpoint_sha256"] == read_results(run / "base")["checkpoint_sha256"] != first["checkpoint_sha256"]


def test_report_refuses_pairs_of_other_models_and_impossible_accuracies(root, tmp_path, capsys):
    one_job(root, tmp_path, "1")
    one_job(root, tmp_path, "2")
    b2n = tmp_path / "base2new"
    tables.report(str(b2n))  # sound

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
