"""kernels/bench.py's timing on the CPU, with fake steps and a fake timer: every implementation
warmed up, the implementations interleaved in a rotating order, medians and ratios per
implementation over the interleaved rounds. (The benchmark itself needs CUDA.)"""
from kernels import bench

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
