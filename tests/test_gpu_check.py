"""`make gpu-check` (.ci/gpu-check) composed and failing as it must, run with a fake python
that records its calls: a GPU session must not be spent on a script that cannot fail."""
import os
import stat
import subprocess
import sys

import pytest

from helpers import REPO

FAKE_PYTHON = """#!/usr/bin/env bash
# records its environment's TRITON_INTERPRET and arguments (one line per call); fails when
# they contain $FAKE_FAIL
all="$*"
echo "TRITON_INTERPRET=${TRITON_INTERPRET-unset} ${all//$'\n'/ }" >> "$FAKE_CALLS"
if [ -n "$FAKE_FAIL" ]; then case "$*" in *"$FAKE_FAIL"*) exit 3 ;; esac; fi
if [ -n "$FAKE_SLOW" ]; then case "$*" in *"$FAKE_SLOW"*) sleep 3 ;; esac; fi
prev=
for arg in "$@"; do  # train.py's outputs, so the script can copy them
    if [ "$prev" = --output-dir ]; then mkdir -p "$arg" && touch "$arg/log.jsonl" "$arg/results.json"; fi
    prev=$arg
done
"""
STEPS = ["versions", "kernel-check", "pytest", "kernels-bench", "train-benchmark", "eval-benchmark",
         "promptkd-train-benchmark", "promptkd-eval-benchmark", "family-benchmarks", "whole-run-bf16",
         "table-benchmark", "synthetic-data", "train-fp16"]


def gpu_check(tmp_path, fail=None, via_make=False, slow=None, budget=None):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    # a leftover interpreter flag must not reach the suite
    env = dict(os.environ, FAKE_CALLS=str(calls), FAKE_FAIL=fail or "", FAKE_SLOW=slow or "", TRITON_INTERPRET="1")
    if budget is not None:
        env["GPU_BUDGET"] = str(budget)
    if via_make:
        cmd = ["make", "--no-print-directory", "-C", REPO, "gpu-check", f"GPU_PYTHON={fake}", f"GPU_OUT={out}"]
    else:
        cmd = [os.path.join(REPO, ".ci", "gpu-check")]
        env.update(GPU_PYTHON=str(fake), GPU_OUT=str(out))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return proc, out, lines


def test_gpu_check_runs_every_step_and_passes_when_all_do(tmp_path):
    proc, out, calls = gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch.cuda.is_available()" in calls[0]
    expected = [  # (fragment of the call, in order)
        "import sys, torch, triton",
        "TRITON_INTERPRET=unset -c import sys, torch, kernels.self_check "
        "sys.exit(not kernels.self_check.check_device(torch.device('cuda')))",
        "TRITON_INTERPRET=unset -m pytest -q -rfEs -p no:cacheprovider tests",
        "-m kernels.bench",
        "bench.py step --num-classes 100",
        "bench.py step --eval --num-classes 1000",
        "bench.py step --method promptkd --batch-size 8",
        "bench.py step --eval --method promptkd --batch-size 8",
        "bench.main(['step', '--method', method, '--num-classes', '100', '--steps', '6', '--warmup', '2', *mode]) "
        "cocoop kgcoop ivlp maple promptsrc",
        "bench.py run --num-classes 10 --precision bf16",
        "bench.py table --datasets 1 --seeds 2",
        "clip_model.random_state_dict(clip_model.CONFIGS['ViT-B/16'])",
        "--precision fp16",
    ]
    assert len(calls) == 1 + len(expected)
    for call, fragment in zip(calls[1:], expected):
        assert fragment in call, (fragment, call)
    assert calls[-1].split()[1] == "train.py" and "--output-dir" in calls[-1]
    for name in STEPS:
        assert (out / f"{name}.txt").exists(), name
    assert (out / "train-fp16.results.json").exists()
    assert (out / "kernels-README.md").exists()
    assert "passed" in (out / "summary.txt").read_text()


FAILING = {  # a fragment of a step's call -> the step
    "kernels.self_check": "kernel-check", "-m pytest": "pytest",
    "-m kernels.bench": "kernels-bench", "--precision fp16": "train-fp16"}


@pytest.mark.parametrize("failing", list(FAILING))
def test_gpu_check_exits_nonzero_when_any_step_fails_and_still_runs_the_rest(tmp_path, failing):
    proc, out, calls = gpu_check(tmp_path, fail=failing)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(calls) == 1 + len(STEPS)  # every step ran regardless
    summary = (out / "summary.txt").read_text()
    assert f"FAILED: {FAILING[failing]} (exit " in summary and summary.count("(exit") == 1


def test_gpu_check_stops_at_once_without_cuda(tmp_path):
    proc, out, calls = gpu_check(tmp_path, fail="torch.cuda.is_available()")
    assert proc.returncode == 2 and len(calls) == 1
    assert "no CUDA device" in (out / "summary.txt").read_text()


def test_make_gpu_check_fails_when_a_step_fails(tmp_path):
    # `pytest | tee` without pipefail once made the target pass whatever pytest said
    proc, _, calls = gpu_check(tmp_path, fail="-m pytest", via_make=True)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert len(calls) == 1 + len(STEPS)


def test_gpu_check_keeps_within_its_total_budget(tmp_path):
    """The steps share one budget (a device call is limited to 10 minutes): a slow step leaves
    less to the later ones, and those the budget cannot hold are reported as not run."""
    proc, out, calls = gpu_check(tmp_path, slow="-m pytest", budget=7)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert "pytest" not in summary.split("FAILED:")[1]  # slow, not failed
    assert "train-fp16 (not run: budget spent)" in summary
    assert len(calls) < 1 + len(STEPS)


def test_no_cuda_with_a_real_python_is_one_line_without_a_traceback(tmp_path):
    """The availability check was an assert: a 3-line AssertionError traceback before the clear line."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", GPU_PYTHON=sys.executable, GPU_OUT=str(tmp_path / "out"))
    proc = subprocess.run([os.path.join(REPO, ".ci", "gpu-check")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (proc.stdout, proc.stderr) == (f"gpu-check: no CUDA device visible to {sys.executable}\n", "")
