"""kernels/bench.py's timing on the CPU, with fake steps and a fake timer: every implementation warmed
up, the implementations interleaved in a rotating order, medians and ratios per implementation over
the interleaved rounds (the kernel benchmark itself needs CUDA); and bench.py's benchmarks on the
tiny CLIP: they run the functions training and evaluation run, and check their flags first."""
import collections

import pytest
import torch

import bench as benchmarks  # bench.py (kernels.bench is `bench` here)
import data
import train
from helpers import EPOCHS, assert_usage_error, counting, train_argv
from kernels import bench
from textrefiner import TextRefinerCLIP, ZeroShotCLIP

NAMES = ("triton", "torch", "loop")


def recording_steps(calls):
    """{name: step} whose steps append their name to calls."""
    return {name: (lambda name=name: calls.append(name)) for name in NAMES}


def test_every_step_is_warmed_up_then_the_steps_alternate_in_a_rotating_order():
    calls, timed = [], []

    def timer(fn):
        fn()
        timed.append(calls[-1])
        return 1.0

    bench.time_interleaved(recording_steps(calls), timer=timer, warmup=2, rounds=6)
    warmup, rounds = calls[:-len(timed)], calls[-len(timed):]
    assert sorted(warmup) == sorted(NAMES * 2)
    assert rounds == timed  # every timed call went through the timer, nothing else ran
    assert rounds == ["triton", "torch", "loop", "torch", "loop", "triton", "loop", "triton", "torch"] * 2


def test_medians_and_ratios_are_per_implementation_over_the_interleaved_rounds():
    # per round, in each implementation's own order; one slow outlier each, which a mean would feel
    times = {"triton": [2, 2, 50, 2, 2, 2], "torch": [6, 5, 6, 7, 6, 90], "loop": [20, 40, 20, 20, 900, 20]}
    calls = []
    consumed = {name: 0 for name in NAMES}

    def timer(fn):
        fn()
        name = calls[-1]
        consumed[name] += 1
        return times[name][consumed[name] - 1]

    ms = bench.time_interleaved(recording_steps(calls), timer=timer, warmup=1, rounds=6)
    assert consumed == {name: 6 for name in NAMES}
    assert ms == {"triton": 2, "torch": 6, "loop": 20}
    row = bench.table([dict(op="cache_update", n=4, d=8, mode="fwd", ms=ms, bytes=2e6)], "float32").splitlines()[-1]
    assert row == "| cache_update | 4 | 8 | fwd | 2.000 | 6.000 | 20.000 | 3.00x | 10.00x | 1 |"


def test_a_machine_slowing_down_during_the_run_slows_every_implementation_alike():
    # each call costs its implementation's cost times a load that grows with every call made;
    # run one after another, the second would take the whole slowdown (ratio 7.67, not 3)
    cost = {"triton": 1, "torch": 3}
    calls = []

    def timer(fn):
        fn()
        return cost[calls[-1]] * len(calls)

    steps = {name: (lambda name=name: calls.append(name)) for name in cost}
    ms = bench.time_interleaved(steps, timer=timer, warmup=1, rounds=6)
    assert ms["torch"] / ms["triton"] == 3


def test_loader_benchmark_runs(tmp_path, capsys):
    data.write_synthetic_dataset(str(tmp_path), "imagenet_sketch", num_classes=4, images_per_class=8, image_size=16)
    benchmarks.main(["loader", "--dataset", "imagenet_sketch", "--root", str(tmp_path), "--workers", "0",
                     "--batch-size", "4", "--steps", "3", "--resolution", "8"])
    assert "images/s" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bench.py: step and run

STEP = ["step", "--clip", "tiny", "--device", "cpu", "--batch-size", "2", "--num-classes", "3"]


def test_step_benchmark_smoke(capsys):
    rates = benchmarks.main([*STEP, "--steps", "1"])
    assert set(rates) == {"CoOp+TextRefiner", "CoOp"} and all(r > 0 for r in rates.values())  # zero-shot trains nothing
    assert "images/s" in capsys.readouterr().out
    rates = benchmarks.main([*STEP, "--steps", "1", "--eval"])
    assert set(rates) == {"CoOp+TextRefiner", "CoOp", "zero-shot CLIP"}


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps: must be positive"),
    (["--num-classes", "-3"], "--num-classes: must be positive"),
    (["--batch-size", "0"], "--batch-size: must be positive"),
    (["--batch-size", "10000000000"], "--batch-size 10000000000: its 32 px images alone take 114440.9 GiB in float32, "
                                      "more than the"),
    (["--device", "cuda:99"], "argument --device: 'cuda:99': expected cpu, cuda or cuda:N"),
])
def test_nonsense_step_flags_are_refused(flags, message, capsys):
    assert_usage_error(benchmarks.main, ["step", "--clip", "tiny", "--device", "cpu", *flags], message, capsys)


def test_step_out_of_device_memory_names_the_batch_size(monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(benchmarks, "time_interleaved", out_of_memory)
    assert_usage_error(benchmarks.main, STEP, "--batch-size 2: out of memory on cpu (CUDA out of memory. Tried to "
                                              "allocate 20.00 GiB); lower --batch-size", capsys)


@pytest.mark.parametrize("flags, message", [
    (["--log-interval", "0"], "--log-interval: must be positive"),
    (["--epochs", "0"], "--epochs: must be positive"),
    (["--warmup-epochs", "10"], "--warmup-epochs must be in [0, epochs)"),
    (["--lr", "nan"], "--lr: must be positive"),
    (["--eval-batch-size", "0"], "--eval-batch-size: must be positive"),
    (["--images", "2"], "--images must be at least 3"),
])
def test_nonsense_run_flags_are_refused_before_the_dataset_is_written(flags, message, monkeypatch, capsys):
    """bench.py run runs the real train(): its flags are checked as a training run's are, before the
    synthetic dataset is written (not a traceback minutes later)."""
    monkeypatch.setattr(data, "write_synthetic_dataset", lambda *a, **k: pytest.fail("dataset written"))
    assert_usage_error(benchmarks.main, ["run", "--clip", "tiny", "--device", "cpu", *flags], message, capsys)


@pytest.mark.parametrize("argv, message", [
    (["loader", "--dataset", "dtd", "--workers", "-1"], "--workers: must be >= 0, got -1"),
    (["loader", "--dataset", "dtd", "--batch-size", "0"], "--batch-size: must be positive"),
    (["loader", "--dataset", "dtd", "--resolution", "0"], "--resolution: must be positive"),
    (["loader", "--dataset", "dtd", "--steps", "0"], "--steps: must be positive"),
    (["table", "--size", "0"], "--size: must be positive"),
    (["table", "--workers", "-2"], "--workers: must be >= 0"),
    (["table", "--images", "2"], "--images: must be at least 3, got 2"),
    (["synthetic", "OUT", "--classes", "0"], "--classes: must be positive"),
    (["synthetic", "OUT", "--size", "0"], "--size: must be positive"),
    (["synthetic", "OUT", "--teacher-depth", "4"], "--teacher-depth: must be in 1..3 (the teacher CLIP's blocks)"),
    (["synthetic", "OUT", "--images", "2"], "--images 2 for caltech101: images_per_class=2 leaves no train images"),
])
def test_every_number_of_the_other_benchmarks_is_checked_at_start(argv, message, tmp_path, monkeypatch, capsys):
    for name in ("loader", "table"):
        monkeypatch.setattr(benchmarks, name, lambda *a, **k: pytest.fail("started"))
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert_usage_error(benchmarks.main, argv, message, capsys)


def test_benchmarks_time_the_steps_training_and_evaluation_run(run, tmp_path, monkeypatch, capsys):
    """The benchmarks time train()'s and evaluate()'s own step functions, and evaluate as evaluate()
    does: the class features computed once per model, not once per step (a model.eval() per step
    would recompute them every time and time a text-tower pass)."""
    calls = collections.Counter()
    monkeypatch.setattr(train, "train_step", counting(calls, "train_step", train.train_step))
    monkeypatch.setattr(train, "eval_step", counting(calls, "eval_step", train.eval_step))
    for cls in (TextRefinerCLIP, ZeroShotCLIP):
        monkeypatch.setattr(cls, "class_features", counting(calls, cls.__name__, cls.class_features))
    rounds = 3 + 2  # warm-up + timed
    benchmarks.main([*STEP, "--steps", "2"])
    assert calls == {"train_step": 2 * rounds}
    assert "CoOp+TextRefiner step time / CoOp step time" in capsys.readouterr().out
    calls.clear()
    benchmarks.main([*STEP, "--steps", "2", "--eval"])
    assert calls == {"eval_step": 3 * rounds, "TextRefinerCLIP": 2, "ZeroShotCLIP": 1}
    assert "CoOp+TextRefiner images/s / zero-shot CLIP images/s" in capsys.readouterr().out
    calls.clear()
    root, weights, _ = run
    train.main(train_argv(root, weights, str(tmp_path)))
    assert calls["train_step"] == EPOCHS * 4  # 12 train images, batch 4: every step is a train_step
    assert calls["TextRefinerCLIP"] == EPOCHS + 1  # once per val pass and once for the test


def test_run_benchmark_times_every_phase_of_a_real_run(monkeypatch, capsys):
    """bench.py run runs train() itself (counted) on photo-sized JPEGs and accounts for its whole wall
    time by phase."""
    calls = collections.Counter()
    monkeypatch.setattr(train, "train", counting(calls, "train", train.train))
    monkeypatch.setattr(train, "train_step", counting(calls, "train_step", train.train_step))
    seconds = benchmarks.main(["run", "--clip", "tiny", "--device", "cpu", "--workers", "0", "--num-classes", "4",
                               "--images", "8", "--epochs", "2", "--batch-size", "4"])
    assert calls == {"train": 1, "train_step": 2 * 2}  # 2 base classes x 4 train images, batch 4
    phases = ("start-up", "data loading", "compute", "val", "checkpointing", "test")
    assert all(seconds[p] > 0 for p in phases)
    assert sum(seconds[p] for p in phases) <= seconds["wall"]
    assert seconds["other (logging, between phases)"] < 0.5 * seconds["wall"]
    out = capsys.readouterr().out
    assert "500x375 JPEGs" in out and "loader alone" in out and "bounds training" in out


@pytest.mark.slow
def test_table_benchmark_times_every_way_and_counts_what_each_reads(capsys):
    medians = benchmarks.main(["table", "--clip", "tiny", "--device", "cpu", "--size", "32", "--num-classes", "4",
                               "--images", "8", "--workers", "0", "--datasets", "1", "--seeds", "1", "--rounds", "1",
                               "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4"])
    ways = ("separate processes", "one table", "one table, no caches")
    assert set(medians) == set(ways) and all(v > 0 for v in medians.values())
    out = capsys.readouterr().out
    assert "bench table of --method coop: 1 datasets x 1 seeds" in out
    assert "one table / separate processes:" in out and "one table / one table, no caches:" in out
    rows = {line[:34].strip(): line[34:].split() for line in out.splitlines()[-13:]}
    # 4 classes x 8 images: 2 test images a class, each evaluated once (base, then new)
    assert rows["test image files opened"] == ["8", "(1/file)"] * 3
    # the training step: 2 base classes x 4 images, batch 4: 2 steps; the evaluations: 4 val + 4 test
    # images of the base classes, 4 test images of the new ones
    assert rows["image tower images, training"] == ["8"] * 3
    assert rows["image tower images, evaluation"] == ["12"] * 3
    assert all(float(seconds) > 0 for phase in ("compute", "test", "eval.py") for seconds in rows[f"seconds: {phase}"])


def test_decode_benchmark_runs_both_ways_on_the_cpu(run, capsys):
    rates = benchmarks.main(["decode", "--dataset", "caltech101", "--root", run[0], "--workers", "0",
                             "--rounds", "1", "--resolution", "24", "--device", "cpu"])
    assert set(rates) == {"PIL in the loader workers", "decode_jpeg on cpu"} and all(r > 0 for r in rates.values())
    assert "decode_jpeg on cpu / PIL:" in capsys.readouterr().out
