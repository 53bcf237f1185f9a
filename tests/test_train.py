"""train.py end to end on a synthetic CoOp-layout dataset and the tiny random CLIP (CPU).

The helpers here (synthetic data, one shared training run, torchrun, flag errors) are
imported by test_eval.py.
"""
import collections
import gc
import json
import math
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import clip_model
import data
import eval as evaluate_cli
import features
import outputs
import train
from textrefiner import TextRefinerCLIP
from helpers import (
    EPOCHS, LR, REPO, assert_same_tensors, assert_usage_error, copy_dataset, counting, dead_pid, interrupt_at_epoch,
    Interrupted, image_opens, pk_argv, read_log, synthetic, torchrun_two_ranks, train_argv, write_lock)

# 6 classes -> 3 base classes; per class 6 train, 3 val, 3 test images of 32 px: 4 steps/epoch.


def test_lr_schedule_is_warmup_then_cosine():
    """Dassl's schedule with the paper's values: epoch 0 at 1e-5, epoch e >= 1 at
    0.002 * (1 + cos(pi * (e - 1) / 10)) / 2, values computed by hand. The lr is a function of the
    epoch and the recorded flags, so a resumed run needs no scheduler state."""
    flags = SimpleNamespace(lr=0.002, epochs=10, warmup_epochs=1, warmup_lr=1e-5)
    expected = {0: 1e-5, 1: 0.002, 2: 0.0019510565, 5: 0.0013090170, 9: 0.00019098301}
    for epoch, lr in expected.items():
        assert train.lr_at(epoch, flags) == pytest.approx(lr, rel=1e-7)


def test_training_run_logs_and_results(run):
    root, weights, out = run
    log = read_log(out)
    assert [r["epoch"] for r in log] == list(range(EPOCHS))
    # lr of each epoch: 1e-5 warm-up, then LR * (1 + cos(pi * (e - 1) / 3)) / 2 = 0.01, 0.0075
    assert [r["lr"] for r in log] == pytest.approx([1e-5, 0.01, 0.0075], rel=1e-9)
    for r in log:
        assert {"loss", "loss_global", "loss_local", "loss_reg", "val_acc", "seconds"} <= r.keys()
        assert r["loss"] == pytest.approx(r["loss_global"] + 0.02 * r["loss_local"] + 20 * r["loss_reg"], rel=1e-5)
    assert log[-1]["loss"] < log[0]["loss"] - 0.05
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["split"] == "test" and results["num_classes"] == 3 and results["num_images"] == 9
    assert results["classnames"] == ["class_000", "class_001", "class_002"] and results["args"]["lr"] == LR
    assert results["accuracy"] == pytest.approx(sum(results["per_class_accuracy"]) / 3)  # 3 test images each
    best = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    best_epoch = max(range(EPOCHS), key=lambda e: (log[e]["val_acc"], -e))  # first epoch with the top val
    assert best["epoch"] == best_epoch == results["epoch"]
    last = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert last["epoch"] == EPOCHS - 1 and last["best"]["val_acc"] == log[best_epoch]["val_acc"]
    assert_same_tensors(last["best_model"], best["model"])  # resume reads the best model from last.pt
    assert set(last["model"]) == {"prompt_learner.ctx", "refiner.extractor.weight", "refiner.cache"} | {
        f"refiner.align.{m}.{p}" for m in ("fc1", "fc2") for p in ("weight", "bias")} | {
        f"refiner.align.bn.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert not any(name.endswith(".tmp") for name in os.listdir(out))


def test_resume_after_interruption_ends_bitwise_equal(run, tmp_path, monkeypatch, capsys):
    root, weights, out = run
    interrupt_at_epoch(monkeypatch, 1)
    with pytest.raises(Interrupted):
        train.main(train_argv(root, weights, str(tmp_path)))
    monkeypatch.undo()
    assert [r["epoch"] for r in read_log(tmp_path)] == [0]
    # never overwrite a run by accident; resumed flags must match the run's recipe
    assert_usage_error(train.main, train_argv(root, weights, str(tmp_path)), "last.pt exists: pass --resume", capsys)
    assert_usage_error(train.main, train_argv(root, weights, str(tmp_path), "--resume", "--lr", "0.5"),
                       "--resume: flags differ from the run in", capsys)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"epoch": 1, "lr": 0.0')  # a line cut short by the crash
    # kill -9 leaves its lock and a half-written file: neither may block or survive --resume
    write_lock(tmp_path, host=socket.gethostname(), pid=dead_pid())
    (tmp_path / "last.pt.tmp").write_bytes(b"half a checkpoint")
    train.main(train_argv(root, weights, str(tmp_path), "--resume"))
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))
    assert not (tmp_path / ".lock").exists()  # released at the end

    resumed = torch.load(tmp_path / "last.pt", weights_only=True)
    reference = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert_same_tensors(resumed["model"], reference["model"])
    for a, b in zip(resumed["optimizer"]["state"].values(), reference["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert read_log(tmp_path)[-1]["loss"] == read_log(out)[-1]["loss"]
    assert [r["epoch"] for r in read_log(tmp_path)] == list(range(EPOCHS))


@pytest.mark.parametrize("crash_after, epoch", [("best.pt", 0), ("last.pt", 0), ("best.pt", EPOCHS - 1),
                                               ("last.pt", EPOCHS - 1)])
def test_resume_after_a_crash_between_or_after_the_checkpoint_writes(run, tmp_path, monkeypatch, crash_after,
                                                                     epoch):
    """best.pt and last.pt are two files: a crash can land between the two writes, or after
    both but before the log line. In the reference run every epoch is a new best, so each
    epoch writes both. After the crash, --resume must end exactly where the uninterrupted
    run ends: a best.pt of another epoch than last.pt names (or none at all) must change
    neither what the run tests nor what it saves."""
    root, weights, out = run
    assert [r["val_acc"] for r in read_log(out)] == sorted({r["val_acc"] for r in read_log(out)})
    real_save = outputs.save_atomic

    class Crash(Exception):
        pass

    def save_then_crash(obj, path):
        real_save(obj, path)
        if os.path.basename(path) == crash_after and obj["epoch"] == epoch:
            raise Crash

    monkeypatch.setattr(outputs, "save_atomic", save_then_crash)
    with pytest.raises(Crash):
        train.main(train_argv(root, weights, str(tmp_path)))
    monkeypatch.undo()
    train.main(train_argv(root, weights, str(tmp_path), "--resume"))

    for file in ("last.pt", "best.pt"):
        resumed = torch.load(tmp_path / file, weights_only=True)
        reference = torch.load(os.path.join(out, file), weights_only=True)
        assert resumed["epoch"] == reference["epoch"] and resumed["best"] == reference["best"], file
        assert_same_tensors(resumed["model"], reference["model"])
        assert_same_tensors(resumed["best_model"], reference["best_model"])
    with open(tmp_path / "results.json") as f, open(os.path.join(out, "results.json")) as g:
        resumed, reference = json.load(f), json.load(g)
    for key in ("accuracy", "macro_f1", "per_class_accuracy", "epoch"):
        assert resumed[key] == reference[key], key
    assert [r["loss"] for r in read_log(tmp_path)] == [r["loss"] for r in read_log(out)]


def test_rng_state_round_trip_and_only_the_devices_cuda_generator(monkeypatch):
    state = train.rng_state(torch.device("cpu"))
    draws = random.random(), np.random.rand(), torch.rand(1)
    train.set_rng_state(state, torch.device("cpu"))
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(1), draws[2])
    assert state["cuda"] is None  # a CPU run uses no CUDA generator
    # On CUDA only the generator of the rank's own device is saved and restored, so a run
    # resumed with fewer visible GPUs does not index a missing one. No GPU here: record the calls.
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or "gen1")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append(("set", s, device)))
    device = torch.device("cuda", 1)
    state = train.rng_state(device)
    train.set_rng_state(state, device)
    assert state["cuda"] == "gen1" and calls == [("get", device), ("set", "gen1", device)]


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.getsize(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    outputs.save_atomic({"x": torch.arange(1000)}, str(tmp_path / "a.pt"))
    outputs.write_json({"accuracy": 50.0}, str(tmp_path / "a.json"))
    size_pt, size_json = os.path.getsize(tmp_path / "a.pt"), os.path.getsize(tmp_path / "a.json")
    assert events == [("fsync", size_pt), ("replace", size_pt), ("fsync", size_json), ("replace", size_json)]
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["x"], torch.arange(1000))
    assert json.load(open(tmp_path / "a.json")) == {"accuracy": 50.0}
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.pt"]


def test_torchrun_two_ranks_match_one(run, tmp_path):
    """Global batch 4 as 2 ranks x 2 images (gloo): BN statistics and the cache update are
    combined over ranks, gradients averaged, so the run equals the 1-process one."""
    root, weights, out = run
    torchrun_two_ranks("train.py", train_argv(root, weights, str(tmp_path)))
    two = torch.load(tmp_path / "last.pt", weights_only=True)
    one = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert_same_tensors(two["model"], one["model"], exact=False)
    assert len(two["rng"]) == 2
    for a, b in zip(read_log(tmp_path), read_log(out)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["val_acc"] == b["val_acc"]


def test_test_runs_stay_on_the_cpu_on_a_one_gpu_host(monkeypatch, tmp_path):
    """Rank 1 of the 2-rank run above, on a host with one GPU: it must not ask for cuda:1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def set_device(device):
        if device.index >= torch.cuda.device_count():
            raise RuntimeError(f"CUDA error: invalid device ordinal ({device})")
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend, timeout: None)
    monkeypatch.setattr(train.dist, "new_group", lambda timeout: "group")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setattr(train.dist, "get_rank", lambda: rank)
        monkeypatch.setattr(train.dist, "get_world_size", lambda: 2)
        args = train.get_parser().parse_args(train_argv("data", "clip.pt", str(tmp_path)))
        assert train.setup_runtime(args) == (rank, 2, torch.device("cpu"), "group")


def test_one_process_on_another_gpu_makes_it_current(monkeypatch, tmp_path):
    # Triton launches on the current device: `--device cuda:1` without torchrun must set it
    calls = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # --device cuda:1 names a device of this machine
    args = train.get_parser().parse_args(["--device", "cuda:1"])
    assert train.setup_runtime(args) == (0, 1, torch.device("cuda", 1), None)
    assert calls == [torch.device("cuda", 1)]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(run, tmp_path):
    root, weights, _ = run
    # Epoch 0 runs at the 1e-5 warm-up; the first step at lr 1e30 blows the context up.
    argv = train_argv(root, weights, str(tmp_path))
    argv[argv.index("--lr") + 1] = "1e30"
    with pytest.raises(SystemExit, match="non-finite loss .* epoch 2") as err:
        train.main(argv)
    assert "last.pt" in str(err.value)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 0 and all(torch.isfinite(v.float()).all() for v in last["model"].values())
    assert [r["epoch"] for r in read_log(tmp_path)] == [0]
    assert all(math.isfinite(v) for v in read_log(tmp_path)[0].values())


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "nope", "--root", ".", "--output-dir", "x"], "--dataset 'nope'"),
    (["--dataset", "dtd", "--root", "/does/not/exist", "--output-dir", "x"], "--root '/does/not/exist'"),
    (["--dataset", "dtd", "--root", "."], "--output-dir is required"),
    (["--dataset", "dtd", "--root", ".", "--output-dir", "x", "--epochs", "0"], "--epochs: must be positive"),
    (["--dataset", "dtd", "--root", ".", "--output-dir", "x", "--precision", "fp8"], "invalid choice: 'fp8'"),
])
def test_bad_flags_are_clear_errors(argv, message, capsys):
    assert_usage_error(train.main, argv, message, capsys)


def test_missing_split_file_names_the_expected_path(run, tmp_path, capsys):
    _, weights, _ = run
    os.makedirs(tmp_path / "dtd")
    assert_usage_error(train.main, ["--dataset", "dtd", "--root", str(tmp_path), "--clip", weights, "--workers", "0",
                                    "--output-dir", str(tmp_path / "out")], "split_zhou_DescribableTextures.json",
                       capsys)


# ----------------------------------------------------------------------------- reliability

def test_output_dir_lock_refuses_a_second_writer_and_takes_over_stale_locks(tmp_path):
    folder = str(tmp_path)
    lock = outputs.acquire_output_lock(folder)
    with pytest.raises(data.UserError, match=r"in use by another run \(pid \d+ on host"):
        outputs.acquire_output_lock(folder)  # a live process of this host holds it
    outputs.release_output_lock(lock)
    assert not os.path.exists(lock)
    write_lock(folder, host="node-7", pid=dead_pid())  # another host's pid cannot be checked from here
    with pytest.raises(data.UserError, match=r"host node-7 .*if that run is dead .*delete .*\.lock"):
        outputs.acquire_output_lock(folder)
    write_lock(folder, host=socket.gethostname(), pid=dead_pid())  # kill -9 on this host: stale
    assert outputs.acquire_output_lock(folder) == lock
    outputs.release_output_lock(lock)
    write_lock(folder, host=socket.gethostname(), pid=dead_pid(), pidns="pid:[1]")  # another container's
    with pytest.raises(data.UserError, match="in use by another run"):
        outputs.acquire_output_lock(folder)
    write_lock(folder, host=socket.gethostname(), pid=dead_pid())
    assert outputs.acquire_output_lock(folder) == lock
    assert json.load(open(lock))["pid"] == os.getpid()
    outputs.release_output_lock(lock)
    assert sorted(os.listdir(folder)) == []  # no helper file left


def take_over_stale_locks(folder, barrier, outcomes, rounds):
    """A process that, in each round, tries to take the folder's lock at the moment the other does."""
    for _ in range(rounds):
        barrier.wait()  # a stale lock is in place
        lock = None
        try:
            lock = outputs.acquire_output_lock(folder)
            outcomes.put("won")
        except data.UserError as e:
            outcomes.put("refused" if "in use by another run (pid" in str(e) else f"UserError: {e}")
        except Exception as e:
            outcomes.put(f"{type(e).__name__}: {e}")
        barrier.wait()  # both outcomes are in while the winner holds the lock
        if lock:
            outputs.release_output_lock(lock)
        barrier.wait()


def test_two_processes_taking_over_one_stale_lock_exactly_one_wins(tmp_path):
    """A killed run's lock, then two processes at the same moment (a scheduler's requeue and a person's
    --resume; the table runner's workers): one takes it over, the other is refused as by a live run."""
    rounds, context = 200, multiprocessing.get_context("fork")
    barrier, outcomes, stale = context.Barrier(3), context.Queue(), dead_pid()
    workers = [context.Process(target=take_over_stale_locks, args=(str(tmp_path), barrier, outcomes, rounds))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        for n in range(rounds):
            write_lock(tmp_path, host=socket.gethostname(), pid=stale)
            barrier.wait(timeout=60)
            pair = sorted(outcomes.get(timeout=60) for _ in range(2))
            assert pair == ["refused", "won"], f"round {n}: {pair}"
            barrier.wait(timeout=60)
            barrier.wait(timeout=60)
            assert os.listdir(tmp_path) == [], f"round {n}"  # released, no helper file left
    finally:
        barrier.abort()
        for worker in workers:
            worker.join(timeout=10)
            worker.kill()


def test_second_training_into_a_held_output_dir_is_refused_at_start(run, tmp_path, capsys):
    root, weights, _ = run
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, host=socket.gethostname(), pid=holder.pid)
        (tmp_path / "log.jsonl").write_text('{"epoch": 0}\n')  # the other run's
        assert_usage_error(train.main, train_argv(root, weights, str(tmp_path), "--resume"),
                           f"in use by another run (pid {holder.pid}", capsys)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(os.listdir(tmp_path)) == [".lock", "log.jsonl"]  # nothing of the other run touched
    assert (tmp_path / "log.jsonl").read_text() == '{"epoch": 0}\n'


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "last.pt")
    outputs.save_atomic({"epoch": 0}, path)
    os.symlink("/dev/full", path + ".tmp")  # every write there fails with ENOSPC
    with pytest.raises(data.UserError, match=r"cannot write .*last\.pt: No space left on device; the previous "
                                              r"last\.pt is intact"):
        outputs.save_atomic({"epoch": 1}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 0}
    assert os.listdir(tmp_path) == ["last.pt"]


def test_full_output_disk_stops_training_with_a_message_and_resume_continues(run, tmp_path, monkeypatch, capsys):
    root, weights, out = run
    real_save = outputs.save_atomic

    def disk_full_at_epoch_1(obj, path):
        if obj["epoch"] == 1:
            os.symlink("/dev/full", path + ".tmp")  # the disk fills up while epoch 1 is saved
        real_save(obj, path)

    monkeypatch.setattr(outputs, "save_atomic", disk_full_at_epoch_1)
    assert_usage_error(train.main, train_argv(root, weights, str(tmp_path)), "No space left on device; the previous "
                       "best.pt is intact", capsys)
    monkeypatch.undo()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 0
    train.main(train_argv(root, weights, str(tmp_path), "--resume"))  # space freed
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["model"]["refiner.cache"],
                       torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]["refiner.cache"])


def torch_save_fails_at_epoch(epoch):
    """outputs.save_atomic as on a disk that fills while `epoch` is saved: torch.save's writer then raises
    its RuntimeError, not an OSError."""
    real_save = outputs.save_atomic

    def save(obj, path):
        if obj["epoch"] != epoch:
            return real_save(obj, path)

        def torch_save_on_a_full_disk(f):
            f.write(b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4288 vs 4176")
        outputs.replace_atomically(path, torch_save_on_a_full_disk)
    return save


@pytest.mark.parametrize("method", ["coop", "promptkd"])
def test_torch_save_failing_on_a_full_disk_is_one_line_also_when_resumed(method, run, pk_run, tmp_path, monkeypatch,
                                                                          capsys):
    root, weights, out = run
    base, pk_out = pk_run
    argv = train_argv(root, weights, str(tmp_path)) if method == "coop" else pk_argv(base, tmp_path)
    for epoch, extra in ((1, []), (2, ["--resume"])):
        monkeypatch.undo()
        monkeypatch.setattr(outputs, "save_atomic", torch_save_fails_at_epoch(epoch))
        stderr = assert_usage_error(train.main, argv + extra, "unexpected pos 4288 vs 4176; the previous ", capsys)
        assert "free space on that disk, then run the same command again" in stderr
        assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == epoch - 1
        assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    monkeypatch.undo()
    train.main(argv + ["--resume"])  # space freed: ends where an uninterrupted run ends
    assert_same_tensors(torch.load(tmp_path / "last.pt", weights_only=True)["model"],
                        torch.load(os.path.join(out if method == "coop" else pk_out, "last.pt"),
                                   weights_only=True)["model"])


def disk_with(free):
    """A stand-in for shutil.disk_usage: a disk with `free` bytes free."""
    return lambda path: shutil._ntuple_diskusage(2**40, 2**40 - free, free)


def test_a_disk_too_full_for_the_run_is_found_at_start(run, tmp_path, monkeypatch, capsys):
    root, weights, _ = run
    monkeypatch.setattr(shutil, "disk_usage", disk_with(0))
    assert_usage_error(train.main, train_argv(root, weights, str(tmp_path)),
                       f"--output-dir {tmp_path}: its disk has 0.0 MiB free, results.json and the log need 1.0 MiB",
                       capsys)
    # room for the results but not for the checkpoints: refused once the model's size is known
    monkeypatch.setattr(shutil, "disk_usage", disk_with(outputs.MIN_FREE_BYTES + 1))
    monkeypatch.setattr(train, "train_step", lambda *a, **k: pytest.fail("training started"))
    assert_usage_error(train.main, train_argv(root, weights, str(tmp_path)),
                       f"--output-dir {tmp_path}: its disk has 1.0 MiB free, the run's checkpoints (", capsys)
    assert os.listdir(tmp_path) == []  # the lock released, nothing written
    monkeypatch.setattr(shutil, "disk_usage", disk_with(0))
    assert_usage_error(evaluate_cli.main, ["--zeroshot", "--dataset", "caltech101", "--root", root, "--output-dir",
                                           str(tmp_path)], "its disk has 0.0 MiB free", capsys)


@pytest.mark.parametrize("flags, message", [
    (["--warmup-lr", "-1"], "--warmup-lr: must be >= 0, got -1.0"),
    (["--alpha", "-1"], "--alpha: must be in [0, 1], got -1.0"),
    (["--alpha", "100"], "--alpha: must be in [0, 1], got 100.0"),
    (["--cache-momentum", "1.5"], "--cache-momentum: must be in [0, 1]"),
    (["--semantic-weight", "-0.1"], "--semantic-weight: must be >= 0"),
    (["--reg-weight", "-20"], "--reg-weight: must be >= 0"),
    (["--weight-decay", "nan"], "--weight-decay: must be >= 0"),
    (["--momentum", "5"], "--momentum: must be in [0, 1), got 5.0"),
    (["--seed", "-1"], "--seed: must be in [0, 4294967295], got -1"),
    (["--seed", "99999999999999999999"], "--seed: must be in [0, 4294967295], got 99999999999999999999"),
    (["--device", "foo"], "argument --device: 'foo': expected cpu, cuda or cuda:N, N below the"),
    (["--device", "mps"], "argument --device: 'mps': expected cpu, cuda or cuda:N"),
    (["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA devices of this machine"),
    (["--batch-size", "0"], "--batch-size: must be positive"),
    (["--dist-timeout", "0"], "--dist-timeout: must be in (0, 604800]"),
    (["--dist-timeout", "inf"], "--dist-timeout: must be in (0, 604800]"),
    (["--clip", "/no/clip.pt"], "--clip '/no/clip.pt': no such file or folder; expected an official name (ViT-B/32"),
])
def test_nonsense_flags_are_refused(flags, message, tmp_path, capsys):
    argv = ["--dataset", "caltech101", "--root", str(tmp_path), "--output-dir", str(tmp_path / "out"), *flags]
    assert_usage_error(train.main, argv, message, capsys)


def test_topk_beyond_the_clips_patch_tokens_fails_once_it_loads(run, tmp_path, monkeypatch, capsys):
    root, weights, _ = run
    monkeypatch.setattr(data, "build_train_loader", lambda *a, **k: pytest.fail("training started"))
    assert_usage_error(train.main, train_argv(root, weights, str(tmp_path), "--topk", "17"),
                       "--topk must be at most 16, the patch tokens of the CLIP's image tower; got 17", capsys)
    monkeypatch.undo()
    train.main(train_argv(root, weights, str(tmp_path / "plain"), "--topk", "17", "--no-refiner", "--epochs", "1",
                          "--warmup-epochs", "0"))  # no refiner: --topk is not used


def test_output_dir_that_is_a_file_fails_at_start(tmp_path, capsys):
    (tmp_path / "out").write_text("")
    assert_usage_error(train.main, ["--dataset", "caltech101", "--root", str(tmp_path), "--output-dir",
                                    str(tmp_path / "out")], "is a file, not a directory", capsys)


@pytest.mark.parametrize("flags, message", [
    (["--n-ctx", "100", "--ctx-init", ""], "--n-ctx 100: the prompt of class"),
    (["--n-ctx", "5"], "--ctx-init 'a photo of a' is 4 tokens but --n-ctx is 5"),
])
def test_prompt_flags_that_cannot_work_name_the_flag(run, tmp_path, flags, message, capsys):
    root, weights, _ = run
    assert_usage_error(train.main, train_argv(root, weights, str(tmp_path), *flags), message, capsys)
    assert not os.path.exists(tmp_path / "last.pt")


@pytest.mark.parametrize("change, message", [
    (lambda s: dict(s, test=[]), "the test split is empty"),
    (lambda s: dict(s, test=s["test"] + [[s["test"][0][0], 6, "class_006"]]), "has label 6, outside the train labels"),
    (lambda s: dict(s, test=s["test"] + [["class_000/gone.jpg", 0, "class_000"]]), "class_000/gone.jpg"),
])
def test_bad_test_split_is_reported_before_training(run, tmp_path, change, message, capsys):
    root, weights, _ = run
    root = copy_dataset(root, tmp_path, change)
    t0 = time.perf_counter()
    assert_usage_error(train.main, train_argv(root, weights, str(tmp_path / "out")), message, capsys)
    assert not os.path.exists(tmp_path / "out" / "last.pt") and time.perf_counter() - t0 < 30


def test_unreadable_image_in_a_loader_worker_is_one_line(run, tmp_path, capsys, monkeypatch):
    """Images are checked to exist at start, not decoded (too slow for ImageNet): a corrupt one
    fails in a worker process, whose traceback the loader attaches; the user sees one line."""
    # torch joins the workers of a loader whose worker raised only after this timeout (5 s): the
    # loaders are collected below, within the test, with a shorter one
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    root, weights, _ = run
    root = copy_dataset(root, tmp_path, lambda s: s)
    with open(os.path.join(root, "caltech-101", "split_zhou_Caltech101.json")) as f:
        first_test = json.load(f)["test"][0][0]
    os.remove(tmp_path / "data" / "caltech-101" / "101_ObjectCategories")  # own image folder: one file corrupt
    shutil.copytree(os.path.join(run[0], "caltech-101", "101_ObjectCategories"),
                    tmp_path / "data" / "caltech-101" / "101_ObjectCategories")
    (tmp_path / "data" / "caltech-101" / "101_ObjectCategories" / first_test).write_bytes(b"not an image")
    argv = train_argv(root, weights, str(tmp_path / "out"), "--epochs", "1", "--warmup-epochs", "0", "--selection", "last")
    argv[argv.index("--workers") + 1] = "1"
    assert_usage_error(train.main, argv, f"cannot read image {root}/caltech-101/101_ObjectCategories/{first_test}",
                       capsys)
    gc.collect()


def test_truncated_last_pt_is_a_clear_error(run, tmp_path, capsys):
    root, weights, out = run
    with open(os.path.join(out, "last.pt"), "rb") as f:
        whole = f.read()
    for content in (b"", whole[:len(whole) // 2]):
        (tmp_path / "last.pt").write_bytes(content)
        assert_usage_error(train.main, train_argv(root, weights, str(tmp_path), "--resume"),
                           f"last.pt: not a complete checkpoint ({len(content)} bytes", capsys)


def test_official_clip_name_offline_says_to_pass_a_file(run, tmp_path, monkeypatch, capsys):
    import urllib.error
    import urllib.request
    root, weights, _ = run
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip/ViT-B-16.pt

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    argv = train_argv(root, weights, str(tmp_path / "out"))
    argv[argv.index("--clip") + 1] = "ViT-B/16"
    stderr = assert_usage_error(train.main, argv, "--clip ViT-B/16: cannot download", capsys)
    assert "or pass the path of a local weights file instead of the name" in stderr


STALL_SCRIPT = """
import os, sys, time
sys.path.insert(0, {repo!r})
import eval as evaluate_cli, train
if os.environ["RANK"] == "1":  # stands in for an NFS stall: this rank arrives late everywhere
    real = train.evaluate
    train.evaluate = lambda *a, **k: time.sleep(60) or real(*a, **k)
evaluate_cli.main(sys.argv[1:])
"""


def test_stalled_rank_times_out_with_a_message_naming_rank_and_collective(run, tmp_path):
    root, weights, out = run
    script = tmp_path / "stall.py"
    script.write_text(STALL_SCRIPT.format(repo=REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--checkpoint", os.path.join(out, "best.pt"), "--workers", "0", "--dist-timeout", "10"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and time.perf_counter() - t0 < 55
    # 10 s: short, yet long enough that a slow start of one rank on a busy machine is no stall
    assert "rank 0: timed out after 10 s (--dist-timeout) in the all-reduce of the evaluation counts" in proc.stderr, \
        proc.stderr[-5000:]


def test_feature_cache_one_tower_pass_per_val_test_image_and_identical_results(tmp_path, monkeypatch):
    """base2new with val on an ImageNet-layout dataset (its val split is its test split):
    with the caches every val/test image goes through the image tower for evaluation exactly
    once per run, and every image file, val/test or training, is opened once (the training
    images decoded once, data.DecodedImages); the logits, val accuracies and test metrics are
    bitwise those of a run with --no-feature-cache, which encodes the val/test images at every
    evaluation and opens each training image every epoch it is drawn."""
    root = str(tmp_path / "data")
    data.write_synthetic_dataset(root, "imagenet", num_classes=6, images_per_class=8, image_size=32)
    weights = synthetic(str(tmp_path))[1]
    test_items = data.load_splits("imagenet", root, subsample="base")["test"]
    assert len(test_items) == 3 * 2  # 3 base classes x 2 val (= test) images
    encoded, logits = collections.Counter(), {}
    real_features, real_step = TextRefinerCLIP.image_features, train.eval_step

    def counted_features(self, images):
        if not self.training:
            encoded[run_name] += images.shape[0]
        return real_features(self, images)

    def recorded_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        logits.setdefault(run_name, []).append(out[0])
        return out

    monkeypatch.setattr(TextRefinerCLIP, "image_features", counted_features)
    monkeypatch.setattr(TextRefinerCLIP, "frozen_image_features", True, raising=False)  # still the frozen tower
    monkeypatch.setattr(train, "eval_step", recorded_step)
    results, opens = {}, {}
    for run_name, extra in (("cached", ()), ("uncached", ("--no-feature-cache",))):
        out = str(tmp_path / run_name)
        argv = train_argv(root, weights, out, *extra)
        argv[argv.index("caltech101")] = "imagenet"
        with image_opens(str(tmp_path / f"{run_name}.opens")) as opened:
            results[run_name] = train.main(argv), read_log(out)
        opens[run_name] = opened()
    assert encoded == {"cached": len(test_items), "uncached": (EPOCHS + 1) * len(test_items)}
    train_items = data.load_splits("imagenet", root, subsample="base")["train"]
    train_files = {os.path.abspath(i.impath) for i in train_items}
    test_files = {os.path.abspath(i.impath) for i in test_items}
    assert opens["cached"] == dict.fromkeys(train_files | test_files, 1)
    steps = len(train_files) // 4  # batch 4, the last incomplete batch dropped
    assert sum(opens["uncached"][f] for f in train_files) == EPOCHS * steps * 4
    assert all(opens["uncached"][f] == EPOCHS + 1 for f in test_files)
    (cached, cached_log), (uncached, uncached_log) = results["cached"], results["uncached"]
    for key in ("accuracy", "macro_f1", "per_class_accuracy", "num_images", "epoch"):
        assert cached[key] == uncached[key], key
    assert [r["val_acc"] for r in cached_log] == [r["val_acc"] for r in uncached_log]
    assert len(logits["cached"]) == len(logits["uncached"]) == EPOCHS + 1  # one batch per evaluation
    assert all(torch.equal(a, b) for a, b in zip(logits["cached"], logits["uncached"]))


def test_feature_cache_is_not_used_for_a_model_whose_image_features_train(run, monkeypatch):
    """A model that does not declare frozen image features (e.g. one with trainable visual
    prompts) is encoded at every evaluation, and nothing is stored for it."""
    root, weights, _ = run
    splits = data.load_splits("caltech101", root, subsample="base")
    loader = data.build_eval_loader(splits["test"], 4, 32, workers=0)
    model = TextRefinerCLIP(clip_model.load_clip(weights), splits["classnames"])
    forwards = collections.Counter()
    real_forward = TextRefinerCLIP.forward
    monkeypatch.setattr(TextRefinerCLIP, "forward", counting(forwards, "forward", real_forward))
    cache = features.FeatureCache()  # a run's feature cache
    model.frozen_image_features = False
    first = train.evaluate(model, loader, splits["classnames"], torch.device("cpu"), "fp32", cache)
    second = train.evaluate(model, loader, splits["classnames"], torch.device("cpu"), "fp32", cache)
    assert forwards["forward"] == 2 * len(loader) and len(cache) == 0 and first == second
    model.frozen_image_features = True
    train.evaluate(model, loader, splits["classnames"], torch.device("cpu"), "fp32", cache)
    assert forwards["forward"] == 2 * len(loader) and len(cache) == 1  # logits() from features




def test_nonfinite_clip_or_checkpoint_is_refused_at_load_naming_file_and_tensor(run, tmp_path, capsys):
    root, weights, out = run
    clip = torch.load(weights, weights_only=True)
    clip["visual.proj"][0, 0] = float("nan")
    torch.save(clip, tmp_path / "nan-clip.pt")
    argv = train_argv(root, str(tmp_path / "nan-clip.pt"), str(tmp_path / "a"))
    assert_usage_error(train.main, argv, "nan-clip.pt: tensor visual.proj holds NaN or inf values", capsys)
    assert not os.path.exists(tmp_path / "a" / "log.jsonl")
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    ckpt["best_model"]["refiner.cache"][2, 1] = float("inf")
    os.makedirs(tmp_path / "b")
    torch.save(ckpt, tmp_path / "b" / "last.pt")
    assert_usage_error(train.main, train_argv(root, weights, str(tmp_path / "b"), "--resume"),
                       f"{tmp_path}/b/last.pt: tensor refiner.cache holds NaN or inf values", capsys)


@pytest.mark.parametrize("main", [train.main, evaluate_cli.main], ids=["train", "eval"])
@pytest.mark.parametrize("make, message", [
    (lambda out: os.makedirs(out / "results.json"), "its results.json is a folder, where this command writes a file"),
    (lambda out: os.symlink(out.parent / "nowhere", out), "out is a symbolic link to"),
], ids=["results-json-folder", "dangling-link"])
def test_an_output_dir_that_cannot_take_the_results_names_why_at_start(main, make, message, run, tmp_path, capsys):
    """A results.json that is a folder was "the results of another run (of None)"; a dangling symbolic
    link as --output-dir was "[Errno 17] File exists"."""
    root, weights, out = run
    make(tmp_path / "out")
    argv = train_argv(root, weights, str(tmp_path / "out")) if main is train.main else \
        ["--checkpoint", os.path.join(out, "best.pt"), "--workers", "0", "--output-dir", str(tmp_path / "out")]
    assert_usage_error(main, argv, message, capsys)
    assert not os.path.exists(tmp_path / "nowhere")


def test_a_finished_run_moved_elsewhere_is_still_the_same_run(run, tmp_path, capsys):
    """A run is its content, not its path: a finished folder copied (cp -r) and moved (mv) elsewhere
    resumes (nothing left to train: the same test) and evaluates its own checkpoint into itself; a
    results.json of another checkpoint there is still another run's."""
    root, weights, out = run
    shutil.copytree(out, tmp_path / "copy")
    os.rename(tmp_path / "copy", tmp_path / "moved")
    moved = str(tmp_path / "moved")
    with open(os.path.join(moved, "results.json")) as f:
        before = json.load(f)
    again = train.main(train_argv(root, weights, moved, "--resume"))
    assert (again["accuracy"], again["checkpoint_sha256"]) == (before["accuracy"], before["checkpoint_sha256"])
    evaluated = evaluate_cli.main(["--checkpoint", os.path.join(moved, "best.pt"), "--workers", "0", "--device",
                                   "cpu", "--output-dir", moved])
    assert evaluated["accuracy"] == before["accuracy"]
    with open(os.path.join(moved, "results.json"), "w") as f:
        json.dump(dict(before, checkpoint_sha256="0" * 64), f)
    assert_usage_error(train.main, train_argv(root, weights, moved, "--resume"), "holds the results of another run",
                       capsys)
