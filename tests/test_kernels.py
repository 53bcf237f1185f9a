"""kernels/: the PyTorch reference against hand-worked equations and nn modules, the Triton
kernels against the reference (CPU interpreter here, unchanged on CUDA), the multi-shard
cache combine, and SyncBatchNorm semantics over 2 gloo processes."""
import contextlib
import math
import os
import re
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kernels
from kernels import self_check

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def unit_rows(m, d, seed):
    """A cache as TextRefiner initialises it: U[0, 1) rows, L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.rand(m, d, generator=g), dim=-1).to(DEVICE)


def random_tokens(n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # positive mean like CLIP tokens against a non-negative cache, so scores spread
    return (torch.randn(n, d, generator=g) + 0.3).to(DEVICE, dtype)


def align_params(d_in, seed, d_hid=None, d_out=None):
    """Linear(d_in, d_hid) -> BatchNorm1d(d_hid) -> Linear(d_hid, d_out) parameters; square
    (d_in everywhere) unless told otherwise, as PromptKD's 512 -> 768 -> 768 is not."""
    d_hid = d_in if d_hid is None else d_hid
    d_out = d_hid if d_out is None else d_out
    g = torch.Generator().manual_seed(seed)
    return dict(
        w1=torch.randn(d_hid, d_in, generator=g) / math.sqrt(d_in),
        b1=0.1 * torch.randn(d_hid, generator=g),
        gamma=1.0 + 0.1 * torch.randn(d_hid, generator=g),
        beta=0.1 * torch.randn(d_hid, generator=g),
        w2=torch.randn(d_out, d_hid, generator=g) / math.sqrt(d_hid),
        b2=0.1 * torch.randn(d_out, generator=g),
    )


def assert_close(actual, expected, tol, what):
    """Max abs error within tol of the expected tensor's scale (scale at least 1, so
    analytically-zero gradients such as db1 are compared absolutely)."""
    actual, expected = actual.float(), expected.float()
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


# ---------------------------------------------------------------- the reference, by hand

def test_reference_cache_update_worked_by_hand():
    cache = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.6, -0.8]])
    tokens = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    # normalised: x1 = (1, 0), x2 = (r, r) with r = 1/sqrt(2), x3 = (0, 1)
    # scores: x1 -> (1, 0, -.6); x2 -> (r, r, -1.4 r), a tie: slot 0 wins; x3 -> (0, 1, -.8)
    # assignments (0, 0, 1); column maxima c = (1, 1, -0.6); slot 2 receives nothing
    r = 1.0 / math.sqrt(2.0)
    col_max, sums, counts = kernels.cache_partials(tokens, cache, backend="torch")
    assert torch.allclose(col_max, torch.tensor([1.0, 1.0, -0.6]))
    assert counts.tolist() == [2.0, 1.0, 0.0]
    w2 = math.exp(r - 1.0)  # x2's weight exp(S[2, 0] - c_0); x1, x3 sit at their column max
    assert torch.allclose(sums, torch.tensor([[1.0 + w2 * r, w2 * r], [0.0, 1.0], [0.0, 0.0]]))

    new = kernels.cache_update(tokens, cache, momentum=0.8, backend="torch")
    slot0 = torch.tensor([0.8 + 0.2 * (1.0 + w2 * r), 0.2 * w2 * r])
    expected = torch.stack([slot0 / slot0.norm(), torch.tensor([0.0, 1.0]), torch.tensor([-0.6, -0.8])])
    assert torch.allclose(new, expected, atol=1e-6)


def test_reference_batch_norm_statistics_worked_by_hand():
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 4.0], [6.0, 0.0]])
    eye, zero = torch.eye(2), torch.zeros(2)
    gamma, beta = torch.tensor([2.0, 1.0]), torch.tensor([0.0, 0.5])
    w2, b2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]]), torch.tensor([0.0, -1.0])
    y, mean, var = kernels.feature_align(x, eye, zero, gamma, beta, w2, b2, eps=1e-5, backend="torch")
    # column 0: mean 3, biased var (4 + 1 + 0 + 9) / 4 = 3.5; column 1: mean 1, var (1+1+9+1)/4 = 3
    assert mean.tolist() == [3.0, 1.0]
    assert torch.allclose(var, torch.tensor([3.5, 3.0]))
    s0, s1 = 1 / math.sqrt(3.5 + 1e-5), 1 / math.sqrt(3.0 + 1e-5)
    z = torch.tensor([
        [max(0.0, 2 * (1 - 3) * s0), max(0.0, (0 - 1) * s1 + 0.5)],
        [max(0.0, 2 * (2 - 3) * s0), max(0.0, (0 - 1) * s1 + 0.5)],
        [max(0.0, 2 * (3 - 3) * s0), max(0.0, (4 - 1) * s1 + 0.5)],
        [max(0.0, 2 * (6 - 3) * s0), max(0.0, (0 - 1) * s1 + 0.5)],
    ])
    assert torch.allclose(y, torch.stack([z[:, 0] + z[:, 1], z[:, 1] - 1.0], dim=1), atol=1e-6)


@pytest.mark.parametrize("d_in,d_hid,d_out", [(24, 24, 24), (16, 24, 24), (24, 16, 20)])
def test_reference_feature_align_matches_nn_modules_and_their_gradients(d_in, d_hid, d_out):
    n = 13
    p = align_params(d_in, seed=3, d_hid=d_hid, d_out=d_out)
    x = random_tokens(n, d_in, torch.float32, seed=4).cpu()
    fc1, bn, fc2 = torch.nn.Linear(d_in, d_hid), torch.nn.BatchNorm1d(d_hid, eps=1e-5), torch.nn.Linear(d_hid, d_out)
    with torch.no_grad():
        fc1.weight.copy_(p["w1"]), fc1.bias.copy_(p["b1"]), bn.weight.copy_(p["gamma"])
        bn.bias.copy_(p["beta"]), fc2.weight.copy_(p["w2"]), fc2.bias.copy_(p["b2"])
    x_mod = x.clone().requires_grad_()
    y_mod = fc2(torch.relu(bn.train()(fc1(x_mod))))
    gy = torch.randn(n, d_out)
    (y_mod * gy).sum().backward()

    x_ref = x.clone().requires_grad_()
    q = {k: v.clone().requires_grad_() for k, v in p.items()}
    y, mean, var = kernels.feature_align(x_ref, **q, backend="torch")
    (y * gy).sum().backward()
    assert y.shape == (n, d_out) and mean.shape == var.shape == (d_hid,)
    assert_close(y, y_mod, 1e-5, "y")
    # nn.BatchNorm1d keeps the unbiased variance in its running stats
    h = fc1(x)
    assert_close(mean, h.mean(0), 1e-6, "mean")
    assert_close(var, h.var(0, unbiased=False), 1e-6, "var")
    pairs = dict(x=(x_ref, x_mod), w1=(q["w1"], fc1.weight), b1=(q["b1"], fc1.bias),
                 gamma=(q["gamma"], bn.weight), beta=(q["beta"], bn.bias),
                 w2=(q["w2"], fc2.weight), b2=(q["b2"], fc2.bias))
    for name, (ours, theirs) in pairs.items():
        assert ours.grad.shape == theirs.grad.shape, name
        assert_close(ours.grad, theirs.grad, 1e-5, f"d{name}")


# ------------------------------------------------------------ Triton against the reference

CACHE_CASES = [  # (N, D, M, token dtype): odd/prime N, M > N leaves slots empty
    (1, 64, 1, torch.float32),
    (7, 96, 25, torch.float16),
    (37, 64, 13, torch.float32),
    (37, 512, 25, torch.float16),
    (131, 96, 25, torch.float32),
    (131, 64, 13, torch.float16),
    (131, 512, 1, torch.float32),
]


@pytest.mark.parametrize("n,d,m,dtype", CACHE_CASES)
def test_cache_update_triton_matches_reference(n, d, m, dtype):
    tokens = random_tokens(n, d, dtype, seed=n + d)
    cache = unit_rows(m, d, seed=m)
    got = kernels.cache_partials(tokens, cache, backend="triton")
    want = kernels.cache_partials(tokens, cache, backend="torch")
    assert torch.equal(got[2], want[2]), "slot counts (hence argmax assignments) differ"
    assert_close(got[0], want[0], 1e-6, "col_max")
    assert_close(got[1], want[1], 1e-5, "slot_sums")
    new = kernels.cache_update(tokens, cache, backend="triton")
    assert_close(new, kernels.cache_update(tokens, cache, backend="torch"), 1e-6, "cache")
    assert torch.allclose(new.norm(dim=1), torch.ones(m, device=DEVICE), atol=1e-6)
    # slots without a token keep their row (scaling it would be invisible after the
    # normalisation, so this checks the row is not mixed with anything)
    empty = want[2] == 0
    if m > n:
        assert empty.any()
    assert torch.allclose(new[empty], cache[empty], atol=1e-6)


def test_reference_equals_the_released_slot_by_slot_loop():
    # kernels.bench's loop follows the released code: softmax over rows / column max
    from kernels.bench import loop_cache_update

    tokens = random_tokens(131, 64, torch.float32, seed=7)
    cache = unit_rows(25, 64, seed=7)
    assert_close(loop_cache_update(tokens, cache), kernels.cache_update(tokens, cache, backend="torch"),
                 1e-6, "loop vs reference")


def dyadic_unit_rows(n, d, generator, signed=False):
    """Unit rows with 16 entries of +-1/4 and zeros elsewhere: every score between two such
    rows is a sum of +-1/16 terms, exact in fp32 in any summation order, so duplicate cache
    slots tie bitwise on every BLAS and GPU (random unit rows do not: a CPU matmul may round
    two equal columns differently)."""
    rows = torch.zeros(n, d)
    for row in rows:
        support = torch.randperm(d, generator=generator)[:16]
        signs = torch.randint(0, 2, (16,), generator=generator) * 2 - 1 if signed else 1
        row[support] = 0.25 * signs
    return rows


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cache_ties_break_to_the_lowest_slot(backend):
    # (the CPU interpreter's argmax is always leftmost; on CUDA this checks tie_break_left)
    d = 64
    g = torch.Generator().manual_seed(5)
    cache = dyadic_unit_rows(6, d, g)
    cache[4] = cache[1]  # exact duplicates: every score of slot 4 ties with slot 1, 5 with 2
    cache[5] = cache[2]
    # tokens near slots 1 and 2 (one entry of the slot's support moved elsewhere: score 15/16,
    # so the argmax lands on a tied pair) plus a few anywhere
    near = cache[[1, 2, 1, 2, 1]].clone()
    for row in near:
        row[row.nonzero()[0]] = 0.0
        row[(row == 0).nonzero()[-1]] = 0.25
    tokens = torch.cat([near, dyadic_unit_rows(4, d, g, signed=True)]).to(DEVICE)
    cache = cache.to(DEVICE)
    col_max, _, counts = kernels.cache_partials(tokens, cache, backend=backend)
    assert counts[4] == 0 and counts[5] == 0 and counts[1] >= 3 and counts[2] >= 2
    assert counts.sum() == tokens.shape[0]
    assert col_max[4] == col_max[1] and col_max[5] == col_max[2]
    ref = kernels.cache_partials(tokens, cache, backend="torch")
    assert torch.equal(counts, ref[2])


def test_cache_update_triton_is_deterministic():
    tokens = random_tokens(131, 96, torch.float32, seed=8)
    cache = unit_rows(25, 96, seed=9)
    first = kernels.cache_partials(tokens, cache, backend="triton")
    again = kernels.cache_partials(tokens, cache, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def combine_shards(shard_partials, cache, momentum):
    """The documented multi-rank combine, with all_reduce simulated over a list."""
    g = torch.stack([p[0] for p in shard_partials]).amax(dim=0)  # all_reduce MAX
    sums = sum(p[1] * torch.exp(p[0] - g)[:, None] for p in shard_partials)  # rescale, SUM
    counts = sum(p[2] for p in shard_partials)
    return kernels.cache_apply(cache, g, sums, counts, momentum)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bounds", [(19,), (5, 40)])  # 2 and 3 uneven shards of 53 rows
def test_cache_partials_combine_over_shards_equals_one_shot(backend, bounds):
    tokens = random_tokens(53, 96, torch.float32, seed=10)
    cache = unit_rows(13, 96, seed=11)
    edges = (0, *bounds, tokens.shape[0])
    shards = [tokens[a:b] for a, b in zip(edges[:-1], edges[1:])]
    partials = [kernels.cache_partials(s, cache, backend=backend) for s in shards]
    combined = combine_shards(partials, cache, momentum=0.8)
    assert_close(combined, kernels.cache_update(tokens, cache, backend=backend), 1e-6, "combined cache")
    # a shard's own col_max is below the global one somewhere, so the rescale is exercised
    one_shot = kernels.cache_partials(tokens, cache, backend="torch")[0]
    assert any((p[0] < one_shot).any() for p in partials)


ALIGN_CASES = [  # (N, D, x dtype): square, TextRefiner on CoOp
    (1, 64, torch.float32),
    (7, 96, torch.float16),
    (7, 512, torch.float32),
    (37, 64, torch.float32),
    (131, 96, torch.float32),
    (131, 64, torch.float16),
    (37, 512, torch.float16),
]
RECT_ALIGN_CASES = [  # (N, D_in, D_hid, D_out, x dtype): widening as PromptKD's 512 -> 768, narrowing,
    (1, 48, 80, 80, torch.float32),  # and a rectangular second Linear; one prime-width case
    (7, 48, 80, 80, torch.float16),
    (37, 64, 96, 96, torch.float32),
    (53, 64, 96, 96, torch.float16),
    (53, 96, 64, 64, torch.float32),
    (7, 96, 64, 64, torch.float16),
    (131, 48, 80, 80, torch.float32),  # 3 row blocks: the statistics' fixed-order combine
    (37, 48, 80, 64, torch.float32),
    (53, 96, 64, 80, torch.float16),
    (37, 29, 53, 41, torch.float32),
]


def run_feature_align(x, params, gy, backend, process_group=None):
    """Forward + backward of (y * gy).sum(); returns y, mean, var and the gradients."""
    x = x.clone().requires_grad_()
    q = {k: v.clone().to(x.device).requires_grad_() for k, v in params.items()}
    y, mean, var = kernels.feature_align(x, **q, backend=backend, process_group=process_group)
    (y * gy).sum().backward()
    grads = {"x": x.grad, **{k: v.grad for k, v in q.items()}}
    return y.detach(), mean, var, grads


@pytest.mark.parametrize("n,d_in,d_hid,d_out,dtype", [(n, d, d, d, dtype) for n, d, dtype in ALIGN_CASES]
                         + RECT_ALIGN_CASES)
def test_feature_align_triton_matches_reference(n, d_in, d_hid, d_out, dtype):
    x = random_tokens(n, d_in, dtype, seed=n * d_in)
    params = align_params(d_in, seed=d_in, d_hid=d_hid, d_out=d_out)
    gy = torch.randn(n, d_out, generator=torch.Generator().manual_seed(n)).to(DEVICE)
    y, mean, var, grads = run_feature_align(x, params, gy, "triton")
    y_ref, mean_ref, var_ref, grads_ref = run_feature_align(x, params, gy, "torch")
    assert y.dtype == mean.dtype == var.dtype == torch.float32
    assert y.shape == (n, d_out) and mean.shape == var.shape == (d_hid,)
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(mean, mean_ref, 1e-6, "mean")
    assert_close(var, var_ref, 1e-5, "var")
    for name, g in grads.items():
        assert g.dtype == (dtype if name == "x" else torch.float32), name
        assert g.shape == grads_ref[name].shape, name
        # dx is rounded to the token dtype on the way out
        tol = 2e-3 if (name == "x" and dtype != torch.float32) else 1e-5
        assert_close(g, grads_ref[name], tol, f"d{name}")


def test_triton_accepts_strided_inputs():
    # a transposed view must give the contiguous result (the launchers pass the tokens contiguous)
    x = random_tokens(64, 37, torch.float32, seed=16).t()  # (37, 64), strides (1, 37)
    assert not x.is_contiguous()
    cache = unit_rows(13, 64, seed=17)
    assert_close(kernels.cache_update(x, cache, backend="triton"),
                 kernels.cache_update(x.contiguous(), cache, backend="torch"), 1e-6, "cache")
    params = align_params(64, seed=18)
    gy = torch.randn(37, 64, generator=torch.Generator().manual_seed(19)).to(DEVICE)
    got = run_feature_align(x, params, gy, "triton")
    want = run_feature_align(x.contiguous(), params, gy, "torch")
    assert_close(got[0], want[0], 1e-5, "y")
    for name in got[3]:
        assert_close(got[3][name], want[3][name], 1e-5, f"d{name}")


def test_launchers_reject_bad_inputs():
    cache = unit_rows(5, 16, seed=0)
    with pytest.raises(ValueError, match="cache_partials"):
        kernels.cache_update(torch.randn(3, 8, device=DEVICE), cache)
    with pytest.raises(TypeError, match="fp32"):
        kernels.cache_update(torch.randn(3, 16, device=DEVICE), cache.double())
    with pytest.raises(ValueError, match="backend"):
        kernels.cache_update(torch.randn(3, 16, device=DEVICE), cache, backend="cuda")
    p = align_params(16, seed=0)
    with pytest.raises(ValueError, match="w2"):
        kernels.feature_align(torch.randn(4, 16), **{**p, "w2": torch.randn(16, 8)})
    with pytest.raises(TypeError, match="int64"):
        kernels.feature_align(torch.ones(4, 16, dtype=torch.int64), **p)
    # rectangular (PromptKD-like 16 -> 24 -> 20): the message names the tensor and its shape
    r = {k: v.to(DEVICE) for k, v in align_params(16, seed=0, d_hid=24, d_out=20).items()}
    x = torch.randn(4, 16, device=DEVICE)
    widths = "D_in=16, D_hid=24, D_out=20"
    for name, shape, message in [
        ("x", (4, 24), r"w1 must be \(D_hid, 24\) for x of width D_in=24, got \(24, 16\)"),
        ("w1", (24, 24), r"w1 must be \(D_hid, 16\) for x of width D_in=16, got \(24, 24\)"),
        ("b1", (16,), rf"b1 must be \(24,\) for {widths}, got \(16,\)"),
        ("gamma", (20,), rf"gamma must be \(24,\) for {widths}"),
        ("beta", (1, 24), rf"beta must be \(24,\) for {widths}"),
        ("w2", (20, 16), r"w2 must be \(D_out, 24\) for w1 of 24 rows \(D_hid\), got \(20, 16\)"),
        ("b2", (24,), rf"b2 must be \(20,\) for {widths}, got \(24,\)"),
    ]:
        inputs = {"x": x, **r, name: torch.randn(shape, device=DEVICE)}
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match=message):
                kernels.feature_align(**inputs, backend=backend)


def test_auto_backend_uses_the_reference_for_caches_the_kernel_cannot_hold():
    cuda, cpu, limit = torch.device("cuda"), torch.device("cpu"), kernels.TRITON_MAX_CACHE_SIZE
    assert kernels._cache_uses_triton("auto", cuda, limit)
    assert not kernels._cache_uses_triton("auto", cuda, limit + 1)  # e.g. --cache-size 200 on a GPU
    assert not kernels._cache_uses_triton("auto", cpu, 25)
    assert not kernels._cache_uses_triton("torch", cuda, 25)
    with pytest.raises(ValueError, match=f"at most {limit} rows, got M={limit + 1}"):
        kernels._cache_uses_triton("triton", cuda, limit + 1)
    tokens, cache = random_tokens(7, 16, torch.float32, seed=3), unit_rows(200, 16, seed=4)
    assert_close(kernels.cache_update(tokens, cache), kernels.cache_update(tokens, cache, backend="torch"),
                 0, "auto cache update, M=200")


def test_reference_path_needs_no_triton():
    """Without triton installed (it ships for Linux only) the package imports and the CPU
    path runs; asking for Triton says what is missing."""
    script = """
import sys
sys.modules["triton"] = None  # as if not installed: importing it raises ModuleNotFoundError
import torch
import kernels, textrefiner
x, cache = torch.randn(6, 8), torch.nn.functional.normalize(torch.rand(3, 8), dim=-1)
for backend in ("auto", "torch"):
    kernels.cache_update(x, cache, backend=backend)
try:
    kernels.cache_update(x, cache, backend="triton")
except ModuleNotFoundError as error:
    print(error)
"""
    env = dict(os.environ, TRITON_INTERPRET="1")  # so the CPU tensors get past the device check
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "the Triton backend needs the triton package" in done.stdout


# ---------------------------------------------------------------- launches, sizes, edge cases

def record_launches(monkeypatch, execute):
    """Wrap every Triton kernel's launch to record (kernel name, grid, device made current
    by kernels.on_device); execute=False records without running (any shape, no compute)."""
    from triton.runtime.jit import KernelInterface  # JITFunction, or InterpretedFunction

    from kernels import triton_cache_update, triton_feature_align

    launches, current = [], []

    @contextlib.contextmanager
    def on_device(device):  # stands in for torch.cuda.device on CUDA, so CPU tensors count
        current.append(device)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(kernels, "on_device", on_device)
    monkeypatch.setattr(triton_feature_align, "on_device", on_device)
    for module in (triton_cache_update, triton_feature_align):
        for name, kernel in vars(module).items():
            if isinstance(kernel, KernelInterface):
                def run(*args, grid, warmup, _kernel=kernel, _run=type(kernel).run, _name=name, **kw):
                    launches.append((_name, tuple(grid), current[-1] if current else None))
                    if execute:
                        return _run(_kernel, *args, grid=grid, warmup=warmup, **kw)
                monkeypatch.setattr(kernel, "run", run, raising=False)
    return launches


def test_on_device_makes_the_tensors_cuda_device_current():
    guard = kernels.on_device(torch.device("cuda", 1))  # constructing it needs no GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(kernels.on_device(torch.device("cpu")), contextlib.nullcontext)


def test_every_triton_launch_runs_on_the_tensors_device(monkeypatch):
    # Triton launches on the current CUDA device, not the tensors': `train.py --device cuda:1`
    # without torchrun failed at the first step. Forward, backward and the cache update.
    launches = record_launches(monkeypatch, execute=True)
    x = random_tokens(37, 64, torch.float32, seed=30)
    gy = torch.randn(37, 64, generator=torch.Generator().manual_seed(31)).to(DEVICE)
    run_feature_align(x, align_params(64, seed=32), gy, "triton")
    kernels.cache_update(x, unit_rows(13, 64, seed=33), backend="triton")
    names = {name for name, _, _ in launches}
    assert names == {"_matmul_kernel", "_bn_input_grad_kernel", "_cache_scores_kernel", "_slot_sums_kernel"}
    assert all(device == x.device for _, _, device in launches), launches


@pytest.mark.parametrize("d", [512, 768])
def test_every_launch_has_enough_programs_for_a_gpu(monkeypatch, d):
    """At a ViT-B/16 batch of 32 (6304 tokens) every launch has at least 132 programs (the SMs
    of an H100/H200): dW1 and dW2 (D x D outputs, 32 tiles at D=512) split the token
    reduction. Launches are recorded, not run."""
    launches = record_launches(monkeypatch, execute=False)
    n = 32 * 197
    x = torch.zeros(n, d, device=DEVICE, requires_grad=True)
    params = {k: v.to(DEVICE).requires_grad_() for k, v in align_params(d, seed=0).items()}
    y, _, _ = kernels.feature_align(x, **params, backend="triton")
    y.backward(torch.zeros(n, d, device=DEVICE))
    kernels.cache_partials(x.detach(), unit_rows(25, d, seed=0), backend="triton")
    assert len(launches) == 9  # h, y; dpre, dw2, dh, dx, dw1; scores, slot sums
    for name, grid, _ in launches:
        assert math.prod(grid) >= 132, (name, grid)


@pytest.mark.parametrize("n", [8 * 197, 32 * 197])
def test_promptkd_align_launches_fill_a_gpu(monkeypatch, n):
    """PromptKD's align (512 -> 768 -> 768) at its batch of 8 images and at 32:
    every launch of forward and backward (dx included: the student's visual prompts are
    trained through it) has at least 132 programs. At N = 1576, dx = dh @ w1 (1576 x 512)
    has only 25 x 4 tiles of 64 x 128, so it takes 64 x 64 ones. Recorded, not run."""
    launches = record_launches(monkeypatch, execute=False)
    x = torch.zeros(n, 512, device=DEVICE, requires_grad=True)
    params = {k: v.to(DEVICE).requires_grad_() for k, v in align_params(512, seed=0, d_hid=768).items()}
    y, _, _ = kernels.feature_align(x, **params, backend="triton")
    y.backward(torch.zeros(n, 768, device=DEVICE))
    assert len(launches) == 7  # h, y; dpre, dw2, dh, dx, dw1
    for name, grid, _ in launches:
        assert math.prod(grid) >= 132, (name, grid)


@pytest.mark.parametrize("n,d_in,d_hid,d_out,dtype", [
    (131, 64, 64, 64, torch.float32), (131, 96, 96, 96, torch.float16),
    (37, 64, 64, 64, torch.float32), (131, 48, 80, 64, torch.float32)])
def test_split_k_weight_gradients_match_reference(monkeypatch, n, d_in, d_hid, d_out, dtype):
    from kernels import triton_feature_align

    # splits of one K-step at these small shapes (at full size they come from TARGET_PROGRAMS)
    monkeypatch.setattr(triton_feature_align, "MIN_SPLIT_ROWS", triton_feature_align.BLOCK_K)
    launches = record_launches(monkeypatch, execute=True)
    x = random_tokens(n, d_in, dtype, seed=n + d_in)
    params = align_params(d_in, seed=d_in + 1, d_hid=d_hid, d_out=d_out)
    gy = torch.randn(n, d_out, generator=torch.Generator().manual_seed(n + 2)).to(DEVICE)
    _, _, _, grads = run_feature_align(x, params, gy, "triton")
    _, _, _, grads_ref = run_feature_align(x, params, gy, "torch")
    splits = [grid[2] for name, grid, _ in launches if name == "_matmul_kernel"]
    # dW2 and dW1 were split (the matmuls are h, y; dpre, dw2, dx, dw1), the others not
    assert splits == [1, 1, 1, math.ceil(n / triton_feature_align.BLOCK_K), 1, splits[3]], splits
    for name in ("w1", "w2", "b1", "gamma", "beta"):
        assert_close(grads[name], grads_ref[name], 1e-5, f"d{name}")
    again = run_feature_align(x, params, gy, "triton")[3]
    assert all(torch.equal(again[k], grads[k]) for k in grads)  # fixed-order sum: deterministic


def test_inputs_past_int32_offsets_go_to_the_triton_kernels(monkeypatch):
    """The kernels address what grows with the token count in int64 (next test): 2^31 elements or
    more reach them like any other input. Meta tensors: the sizes are real, nothing is allocated;
    launches recorded, not run."""
    from kernels import triton_feature_align

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the CUDA-tensor check on any host
    launches = record_launches(monkeypatch, execute=False)
    d = 512
    big = torch.empty(2**31 // d + 1, d, device="meta")  # 2^31 + 256 elements
    kernels.cache_partials(big, torch.empty(25, d, device="meta"), backend="triton")
    assert [(name, grid) for name, grid, _ in launches] == [
        ("_cache_scores_kernel", (math.ceil(big.shape[0] / 32),)), ("_slot_sums_kernel", (64, 8))]
    assert kernels._cache_uses_triton("auto", torch.device("cuda"), 25)  # a device object only
    # the Triton feature alignment gets x (the meta device goes no further: its autocast guard)
    calls = []
    monkeypatch.setattr(triton_feature_align, "feature_align", lambda x, *rest, **kw: calls.append(x.shape))
    wide = align_params(d, seed=0, d_hid=768)  # PromptKD's 512 -> 768
    kernels.feature_align(big, **{k: v.to("meta") for k, v in wide.items()}, backend="triton")
    assert calls == [big.shape]


def run_one_program(monkeypatch, kernel, program, *args, **constexprs):
    """Run only the program with ids `program` of the Triton `kernel` in the interpreter, its loads
    reading zeros and its stores writing nothing: -> the set of byte addresses they touched. So it
    may address far past its (small) tensors, as its program of a launch over 2^27 rows would."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    touched = []

    def load(builder, ptrs, mask, *args):
        touched.extend(ptrs.data[mask.data].tolist())
        dtype = ptrs.get_element_ty()
        zeros = np.zeros(ptrs.data.shape, interpreter._get_np_dtype(dtype))
        return interpreter.TensorHandle(zeros, dtype)

    def store(builder, ptrs, value, mask, *args):
        touched.extend(ptrs.data[mask.data].tolist())

    def program_id(builder, axis):
        return interpreter.TensorHandle(np.array([program[axis]], dtype=np.int32), tl.int32)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", load)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", store)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_get_program_id", program_id)
    kernel[(1, 1, 1)](*args, **constexprs)
    return set(touched)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs one program in the interpreter")
def test_every_kernel_addresses_rows_past_int32_offsets_exactly(monkeypatch):
    """The program of each kernel whose rows (or split) start 2^31 elements into contiguous (N, 16)
    token-sized tensors loads and stores exactly there: int32 offsets would wrap to 2^33 bytes
    before the tensor. Only that program runs (run_one_program): nothing that large is allocated."""
    from kernels import triton_cache_update as cache_module
    from kernels import triton_feature_align as align_module

    d, start = 16, 2**27  # row `start` of a (N, 16) tensor lies 2^31 elements in
    n = start + 32
    buffers = [torch.zeros(1, d) for _ in range(6)]  # only their addresses are used
    assign = torch.zeros(1, dtype=torch.int32)  # the cache update's slot indices

    def rows(t, count=32):
        """The byte addresses of rows start .. start + count - 1 of a contiguous (N, d) fp32 t."""
        return {t.data_ptr() + 4 * (r * d + c) for r in range(start, start + count) for c in range(d)}

    x, cache, best, inv_norm, block_max, _ = buffers
    touched = run_one_program(monkeypatch, cache_module._cache_scores_kernel, (start // 32,),
                              x, cache, assign, best, inv_norm, block_max, n, 1, d, d, 1, d, 1,
                              EPS=1e-12, M_PAD=16, BLOCK_N=32, BLOCK_D=16)
    assert rows(x) <= touched
    x, best, inv_norm, col_max, part_sums, part_counts = buffers
    touched = run_one_program(monkeypatch, cache_module._slot_sums_kernel, (start // 32, 0),
                              x, assign, best, inv_norm, col_max, part_sums, part_counts,
                              n, d, 32, d, 1, M_PAD=16, BLOCK_N=32, BLOCK_D=16)
    assert rows(x) <= touched

    a, b, c, h, part1, part2 = buffers
    plain = dict(A_BN=align_module.A_PLAIN, HAS_BIAS=False, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    bn = (c, c, c, c)  # mean, rstd, gamma, beta: only read by the A_BN prologues
    # dpre = dy @ w2 gated by h: rows of dy (a), h and dpre (c) are tokens
    touched = run_one_program(monkeypatch, align_module._matmul_kernel, (start // 16, 0, 0),
                              a, b, c, c, *bn, h, part1, part2, n, d, d, d,
                              d, 1, d, 1, 0, d, 1, d, 1, EPILOGUE=align_module.EPI_RELU_BN_GRAD, **plain)
    assert rows(a, count=16) | rows(h, count=16) | rows(c, count=16) <= touched
    # dW1 = dh^T @ x split over the tokens (k): this split starts at token `start` and writes the
    # (16, 16) partial result number start // 16 of a (num_splits, 16, 16) buffer
    touched = run_one_program(monkeypatch, align_module._matmul_kernel, (0, 0, start // 16),
                              a, b, c, c, *bn, c, part1, part2, d, d, n, 16,
                              1, d, d, 1, d * d, d, 1, d, 1, EPILOGUE=align_module.EPI_NONE, **plain)
    assert rows(a, count=16) | rows(b, count=16) | rows(c, count=16) <= touched
    touched = run_one_program(monkeypatch, align_module._bn_input_grad_kernel, (start // 32, 0),
                              a, h, c, c, c, c, n, d, BLOCK_M=32, BLOCK_N=16)
    assert rows(a) | rows(h) <= touched


def test_caller_tensors_reach_the_kernels_contiguous(monkeypatch):
    """The kernels' offsets within a tile are int32, which holds for rows of D elements: dy, the
    caller's, may be a narrow view of a wider gradient (y concatenated with something, say), and
    is made contiguous like x and the cache's tokens. Meta tensors; launches recorded, not run."""
    from kernels import triton_feature_align

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    record_launches(monkeypatch, execute=False)
    left_operands = []
    matmul = triton_feature_align._matmul

    def spy(a, b, out, **kwargs):
        left_operands.append(a)
        return matmul(a, b, out, **kwargs)

    monkeypatch.setattr(triton_feature_align, "_matmul", spy)
    x = torch.empty(4, 16, device="meta", requires_grad=True)
    params = {k: v.to("meta").requires_grad_() for k, v in align_params(16, seed=0, d_hid=24).items()}
    # the Function itself: feature_align's autocast guard does not take the meta device
    y, _, _ = triton_feature_align.FeatureAlignFunction.apply(x, *params.values(), 1e-5, None)
    dy = torch.empty(4, 2**30, device="meta")[:, :24]  # row stride 2^30: offsets up to 3 * 2^30
    assert not dy.is_contiguous()
    y.backward(dy)
    dpre_left = left_operands[2]  # h, y; then dpre = dy @ w2
    assert dpre_left.shape == (4, 24) and dpre_left.is_contiguous()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_token_leaves_the_cache_unchanged(backend, bad):
    # under fp16 one overflowing token is a step the gradient scaler skips: without this it
    # made a cache row NaN for the rest of training
    tokens = random_tokens(37, 64, torch.float32, seed=34)
    cache = unit_rows(13, 64, seed=35)
    assert not torch.equal(kernels.cache_update(tokens, cache, backend=backend), cache)
    tokens[11, 5] = bad
    assert torch.equal(kernels.cache_update(tokens, cache, backend=backend), cache)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_tokens_contribute_nothing(backend):
    cache = unit_rows(13, 64, seed=36)
    col_max, sums, counts = kernels.cache_partials(torch.empty(0, 64, device=DEVICE), cache, backend=backend)
    assert torch.equal(col_max, torch.full((13,), float("-inf"), device=DEVICE))
    assert not sums.any() and not counts.any() and sums.shape == (13, 64)
    # unchanged, up to the renormalisation of its (unit) rows
    assert_close(kernels.cache_update(torch.empty(0, 64, device=DEVICE), cache, backend=backend), cache, 1e-7, "cache")


def test_no_tokens_still_refuses_what_the_other_ranks_refuse():
    """A rank without tokens checks the backend and the cache size like the ranks with tokens,
    so a bad argument is an error on every rank, not on all but one."""
    empty = torch.empty(0, 64, device=DEVICE)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.cache_partials(empty, unit_rows(13, 64, seed=36), backend="cuda")
    with pytest.raises(ValueError, match="at most 128 rows"):
        kernels.cache_partials(empty, unit_rows(129, 64, seed=36), backend="triton")


# ---------------------------------------------------------------- 2 processes over gloo

def _sync_worker(rank, world, init_file, out_dir, align_cases, cache, bounds):
    # backend="triton" needs CUDA tensors or the interpreter. With CUDA both ranks share the
    # one GPU (gloo all_reduces CUDA tensors), so the real kernels run under the group;
    # otherwise the interpreter, switched on here, before the first Triton import: the
    # spawned process has only the environment it was started with.
    if torch.cuda.is_available():
        align_cases = {shape: (x.cuda(), {k: v.cuda() for k, v in params.items()}, gy.cuda())
                       for shape, (x, params, gy) in align_cases.items()}
        cache = cache.cuda()
    else:
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        lo, hi = bounds[rank], bounds[rank + 1]
        results = {}
        for backend in ("torch", "triton"):
            for shape, (x, params, gy) in align_cases.items():
                # no tensor built from a host value per step: on CUDA that is a blocking copy
                with mock.patch.object(torch, "tensor", side_effect=AssertionError("torch.tensor in a step")):
                    results[backend, shape] = run_feature_align(x[lo:hi], params, gy[lo:hi], backend,
                                                                dist.group.WORLD)
            x = align_cases[SQUARE][0]  # the cache sees (aligned) tokens of the square case
            results[backend + "_cache"] = kernels.cache_update(x[lo:hi], cache, backend=backend,
                                                               process_group=dist.group.WORLD)
            # one NaN token on the last rank only: every rank must keep its cache
            poisoned = x[lo:hi].clone()
            if rank == world - 1:
                poisoned[-1, 0] = float("nan")
            results[backend + "_poisoned"] = kernels.cache_update(poisoned, cache, backend=backend,
                                                                  process_group=dist.group.WORLD)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


SQUARE = (24, 24, 24)  # (D_in, D_hid, D_out) of the synced feature alignment: CoOp's square
SYNC_SHAPES = (SQUARE, (16, 24, 20))  # and a rectangular one (PromptKD widens 512 -> 768)


# uneven shards of 5 and 8 rows; a rank without rows (it must join the sums with nothing,
# not raise while the other rank waits in all_reduce)
@pytest.mark.parametrize("bounds", [(0, 5, 13), (0, 0, 13)])
def test_process_group_sync_equals_one_process_on_the_whole_batch(tmp_path, monkeypatch, bounds):
    # the workers start without TRITON_INTERPRET, as on a CUDA host (where conftest does not
    # set it): each must pick the GPU or the interpreter itself
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    n = 13
    align_cases = {(d_in, d_hid, d_out): (random_tokens(n, d_in, torch.float32, seed=12).cpu(),
                                          align_params(d_in, seed=13, d_hid=d_hid, d_out=d_out),
                                          torch.randn(n, d_out, generator=torch.Generator().manual_seed(14)))
                   for d_in, d_hid, d_out in SYNC_SHAPES}
    x = align_cases[SQUARE][0]
    cache = unit_rows(5, x.shape[1], seed=15).cpu()
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path), align_cases, cache, bounds),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False, map_location="cpu") for r in range(2)]
    cache_ref = kernels.cache_update(x, cache, backend="torch")
    for backend in ("torch", "triton"):
        for shape, (x_all, params, gy) in align_cases.items():
            what = f"{backend} {shape}"
            y_ref, mean_ref, var_ref, grads_ref = run_feature_align(x_all, params, gy, "torch")
            per_rank = [r[backend, shape] for r in ranks]
            assert_close(torch.cat([r[0] for r in per_rank]), y_ref, 1e-5, f"{what} y")
            for y, mean, var, _ in per_rank:  # every rank holds the global-batch statistics
                assert_close(mean, mean_ref, 1e-6, f"{what} mean")
                assert_close(var, var_ref, 1e-6, f"{what} var")
            assert_close(torch.cat([r[3]["x"] for r in per_rank]), grads_ref["x"], 1e-5, f"{what} dx")
            for name in params:  # DDP sums (then averages) the ranks' weight gradients
                assert_close(per_rank[0][3][name] + per_rank[1][3][name], grads_ref[name], 1e-5,
                             f"{what} d{name}")
        for r in ranks:
            assert_close(r[backend + "_cache"], cache_ref, 1e-6, f"{backend} synced cache")
            assert torch.equal(r[backend + "_poisoned"], cache), f"{backend}: a NaN token changed the cache"


# ---------------------------------------------------------------- CUDA only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cache_update_triton_gpu_large(dtype):
    tokens = random_tokens(32 * 197, 512, dtype, seed=20)
    cache = unit_rows(25, 512, seed=21)
    got = kernels.cache_partials(tokens, cache, backend="triton")
    want = kernels.cache_partials(tokens, cache, backend="torch")
    # near-ties may flip between two fp32 summation orders: allow a handful of rows
    assert (got[2] - want[2]).abs().sum() <= 4
    assert_close(got[0], want[0], 1e-5, "col_max")
    assert_close(kernels.cache_update(tokens, cache, backend="triton"),
                 kernels.cache_update(tokens, cache, backend="torch"), 1e-3, "cache")


# Two valid fp32 evaluations of h (Triton's FMA order, cuBLAS's) differ by up to ~5e-6 at
# these sizes. A ReLU pre-activation nearer 0 than that may take different gates on the two
# sides, and one flipped gate moves dbeta by the full |dz| (~60x the tolerance): a comparison
# that cannot tell a correct kernel from a wrong one. So the large cases keep every
# pre-activation at least GATE_MARGIN (20x that difference) away from 0; the tolerances stay.
GATE_MARGIN = 1e-4


def with_gate_margin(x, params, eps=1e-5, margin=GATE_MARGIN):
    """params with beta moved per channel (in steps of margin) so that no pre-activation
    (h - mean) * rstd * gamma + beta of the batch x lies within margin of 0. The batch
    statistics do not depend on beta, so nothing else changes."""
    p = {k: v.double().to(x.device) for k, v in params.items()}
    h = x.double() @ p["w1"].t() + p["b1"]  # (N, D)
    mean, var = h.mean(dim=0), h.var(dim=0, unbiased=False)
    centred = (h - mean) * (p["gamma"] / torch.sqrt(var + eps))  # (N, D) pre-activation - beta
    beta = p["beta"].clone()
    for _ in range(1000):
        near = ((centred + beta).abs() < margin).any(dim=0)  # (D,)
        if not near.any():
            return {**params, "beta": beta.float().cpu()}
        beta[near] += margin
    raise AssertionError("with_gate_margin: no beta found")


def large_align_case(n, d, dtype, d_hid=None):
    x = random_tokens(n, d, dtype, seed=22)
    d_out = d if d_hid is None else d_hid
    gy = torch.randn(n, d_out, generator=torch.Generator().manual_seed(24)).to(DEVICE) / math.sqrt(n)
    return x, align_params(d, seed=23, d_hid=d_hid), gy


def assert_large_align_close(got, want, dtype):
    y, mean, var, grads = got
    y_ref, mean_ref, var_ref, grads_ref = want
    assert_close(y, y_ref, 1e-4, "y")
    assert_close(mean, mean_ref, 1e-5, "mean")
    assert_close(var, var_ref, 1e-4, "var")
    for name, g in grads.items():
        assert_close(g, grads_ref[name], 1e-2 if (name == "x" and dtype != torch.float32) else 1e-4, f"d{name}")


def test_large_align_comparison_tells_gate_flips_from_kernel_errors():
    """The GPU test's comparison, on the CPU, between the reference on x and on x moved by a
    relative 5e-6 (h then differs about as much as Triton's and cuBLAS's): with the margin it
    passes, without it the few gates that flip fail it."""
    x, params, gy = large_align_case(32 * 197, 512, torch.float32)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(25)).to(DEVICE)
    moved = x * (1 + 5e-6 * noise)
    safe = with_gate_margin(x, params)
    assert_large_align_close(run_feature_align(moved, safe, gy, "torch"), run_feature_align(x, safe, gy, "torch"),
                             torch.float32)
    with pytest.raises(AssertionError, match="max abs error"):
        assert_large_align_close(run_feature_align(moved, params, gy, "torch"),
                                 run_feature_align(x, params, gy, "torch"), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,d,d_hid", [(32 * 197, 512, 512), (997, 768, 768),
                                       (8 * 197, 512, 768), (32 * 197, 512, 768)])  # PromptKD: 512 -> 768
def test_feature_align_triton_gpu_large(n, d, d_hid, dtype):
    x, params, gy = large_align_case(n, d, dtype, d_hid)
    params = with_gate_margin(x, params)
    assert_large_align_close(run_feature_align(x, params, gy, "triton"), run_feature_align(x, params, gy, "torch"),
                             dtype)


# ---------------------------------------------------------------- the self-check of "auto"

@pytest.fixture
def auto_triton(monkeypatch):
    """"auto" runs the Triton kernels here as on a GPU (the interpreter on a CPU), each checked
    afresh."""
    monkeypatch.setattr(kernels, "TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(self_check, "verdicts", {})


def counted(calls, name, fn):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)
    return wrapper


class IdentityWithBackward(torch.autograd.Function):
    """The identity, with the backward given: a wrong one (doubling) or one that raises."""

    @staticmethod
    def forward(ctx, y, backward):
        ctx.given_backward = backward
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return ctx.given_backward(grad), None


def warning_line(kernel, device, problem):
    """A regular expression of the check's one line; problem: one itself."""
    return (re.escape(f"warning: the Triton {kernel} kernel disagrees with the PyTorch reference on "
                      f"{self_check.device_name(device)}: ") + problem
            + re.escape("; using the reference for the rest of this run\n"))


def test_a_wrong_cache_kernel_is_reported_once_and_the_reference_used_after(auto_triton, monkeypatch,
                                                                            capsys):
    from kernels import triton_cache_update
    real, calls = triton_cache_update.cache_partials, []

    def miscompiled(tokens, cache):  # every slot sum 1% off
        col_max, sums, counts = counted(calls, "triton", real)(tokens, cache)
        return col_max, sums * 1.01, counts

    monkeypatch.setattr(triton_cache_update, "cache_partials", miscompiled)
    tokens, cache = random_tokens(131, 64, torch.float32, seed=40), unit_rows(13, 64, seed=41)
    want = kernels.cache_update(tokens, cache, backend="torch")
    for _ in range(3):
        assert torch.equal(kernels.cache_update(tokens, cache), want)
    assert calls == ["triton"]  # the check's call, no other
    err = capsys.readouterr().err
    problem = r"slot_sums off by \S+ \(tolerance 0.0001 x \S+\)"
    assert re.fullmatch(warning_line("cache update", tokens.device, problem), err), err
    assert list(self_check.verdicts) == [("cache update", tokens.device)]
    # "triton" is never replaced
    assert not torch.equal(kernels.cache_update(tokens, cache, backend="triton"), want)
    assert calls == ["triton"] * 2


@pytest.mark.parametrize("wrong, problem", [
    (lambda y, mean, var: (y * 1.01, mean, var), r"y off by \S+ \(tolerance 0.0001 x \S+\)"),
    (lambda y, mean, var: (IdentityWithBackward.apply(y, lambda g: 2 * g), mean, var),
     r"dx off by \S+ \(tolerance 0.0001 x \S+\)"),
])
def test_a_wrong_feature_alignment_is_reported_once_and_the_reference_used_after(auto_triton, monkeypatch, capsys,
                                                                                  wrong, problem):
    from kernels import triton_feature_align
    real, calls = triton_feature_align.feature_align, []
    monkeypatch.setattr(triton_feature_align, "feature_align",
                        lambda *args, **kwargs: wrong(*counted(calls, "triton", real)(*args, **kwargs)))
    x, params = random_tokens(37, 48, torch.float32, seed=42), align_params(48, seed=43, d_hid=64, d_out=56)
    gy = torch.randn(37, 56, generator=torch.Generator().manual_seed(44)).to(DEVICE)
    want = run_feature_align(x, params, gy, "torch")
    for _ in range(2):
        got = run_feature_align(x, params, gy, "auto")
        assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))
        assert all(torch.equal(got[3][k], want[3][k]) for k in want[3])
    assert calls == ["triton"]
    err = capsys.readouterr().err
    assert re.fullmatch(warning_line("feature alignment", x.device, problem), err), err


def kernel_error(*args, **kwargs):
    """What a kernel that does not build or launch on a device raises."""
    raise RuntimeError("out of resource: shared memory, Required: 233472,\nHardware limit: 232448")


RAISED = "RuntimeError: out of resource: shared memory, Required: 233472, Hardware limit: 232448"


def raised_line(kernel, device):
    """The check's one line for a kernel that raised."""
    return (f"warning: the Triton {kernel} kernel raised on {self_check.device_name(device)}: "
            f"{RAISED}; using the reference for the rest of this run\n")


def test_a_cache_kernel_that_raises_is_reported_once_and_the_reference_used_after(
        auto_triton, monkeypatch, capsys):
    from kernels import triton_cache_update
    calls = []
    broken = counted(calls, "triton", kernel_error)
    monkeypatch.setattr(triton_cache_update, "cache_partials", broken)
    tokens, cache = random_tokens(131, 64, torch.float32, seed=40), unit_rows(13, 64, seed=41)
    want = kernels.cache_update(tokens, cache, backend="torch")
    for _ in range(3):
        assert torch.equal(kernels.cache_update(tokens, cache), want)
    assert calls == ["triton"]  # the check's call, no other
    assert capsys.readouterr().err == raised_line("cache update", tokens.device)
    assert self_check.verdicts == {("cache update", tokens.device): RAISED}
    with pytest.raises(RuntimeError, match="out of resource"):  # "triton" is never replaced
        kernels.cache_update(tokens, cache, backend="triton")


@pytest.mark.parametrize("raises_in", ["forward", "backward"])
def test_a_feature_alignment_that_raises_is_reported_once_and_the_reference_used_after(
        auto_triton, monkeypatch, capsys, raises_in):
    from kernels import triton_feature_align
    real, calls = triton_feature_align.feature_align, []

    def broken(*args, **kwargs):
        calls.append("triton")
        if raises_in == "forward":
            kernel_error()
        y, mean, var = real(*args, **kwargs)
        return IdentityWithBackward.apply(y, kernel_error), mean, var

    monkeypatch.setattr(triton_feature_align, "feature_align", broken)
    x = random_tokens(37, 48, torch.float32, seed=42)
    params = align_params(48, seed=43, d_hid=64, d_out=56)
    gy = torch.randn(37, 56, generator=torch.Generator().manual_seed(44)).to(DEVICE)
    want = run_feature_align(x, params, gy, "torch")
    for _ in range(2):
        got = run_feature_align(x, params, gy, "auto")
        assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))
        assert all(torch.equal(got[3][k], want[3][k]) for k in want[3])
    assert calls == ["triton"]
    assert capsys.readouterr().err == raised_line("feature alignment", x.device)


def test_correct_kernels_pass_the_check_once_and_keep_running(auto_triton, monkeypatch, capsys):
    from kernels import triton_cache_update, triton_feature_align
    calls = []
    monkeypatch.setattr(triton_cache_update, "cache_partials",
                        counted(calls, "cache", triton_cache_update.cache_partials))
    monkeypatch.setattr(triton_feature_align, "feature_align",
                        counted(calls, "align", triton_feature_align.feature_align))
    tokens, cache = random_tokens(131, 64, torch.float32, seed=45), unit_rows(25, 64, seed=46)
    poisoned = tokens.clone()
    poisoned[3, 5] = float("nan")  # an fp16 overflow: the check waits for a finite batch
    assert torch.equal(kernels.cache_update(poisoned, cache), cache)
    assert calls == [] and self_check.verdicts == {}
    for _ in range(2):
        assert_close(kernels.cache_update(tokens, cache), kernels.cache_update(tokens, cache, backend="torch"),
                     1e-6, "cache")
    x, params = random_tokens(37, 64, torch.float16, seed=47), align_params(64, seed=48)
    gy = torch.randn(37, 64, generator=torch.Generator().manual_seed(49)).to(DEVICE)
    for _ in range(2):
        y = run_feature_align(x, params, gy, "auto")[0]
        assert_close(y, run_feature_align(x, params, gy, "torch")[0], 1e-5, "y")
    assert calls == ["cache"] * 3 + ["align"] * 3  # the check, then every call
    assert self_check.verdicts == {("cache update", tokens.device): None,
                                   ("feature alignment", x.device): None}
    assert capsys.readouterr().err == ""


def test_the_align_check_tells_gate_flips_from_kernel_errors_at_training_size():
    """At CoOp's batch (32 x 197 tokens, D 512), two correct computations whose h differs by a
    relative 5e-6 open different ReLU gates (the elementwise comparison fails: test above). The
    check moves beta off the gates of the batch: it passes them, and still catches a gradient off
    by 1% in 8 columns."""
    x, params, _ = large_align_case(32 * 197, 512, torch.float32)
    tensors = (x, *(params[k].to(DEVICE) for k in ("w1", "b1", "gamma", "beta", "w2", "b2")))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(25)).to(DEVICE)

    def moved(x, *rest, **kwargs):
        return kernels.reference.feature_align(x * (1 + 5e-6 * noise), *rest, **kwargs)

    assert self_check.align_mismatch(moved, tensors, 1e-5, None) is None

    def off(*args, **kwargs):
        y, mean, var = kernels.reference.feature_align(*args, **kwargs)
        return y + 0.01 * (y - y.detach()) * (torch.arange(y.shape[1], device=y.device) < 8), mean, var

    problem = self_check.align_mismatch(off, tensors, 1e-5, None)
    assert re.match(r"d(x|w1|b1|gamma|beta|w2|b2) off by ", problem)


def _check_worker(rank, world, init_file, out_dir, x, params):
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors: before the first Triton import of this process
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        kernels.TRITON_DEVICE_TYPES = ("cuda", "cpu")
        from kernels import triton_feature_align
        real = triton_feature_align.feature_align
        if rank == 1:  # miscompiled on this rank's GPU only: its rows of y 1% off, nothing else
            triton_feature_align.feature_align = lambda *a, **k: (lambda y, m, v: (y + 0.01 * y.detach(), m, v))(
                *real(*a, **k))
        lo, hi = (0, 5, 13)[rank], (0, 5, 13)[rank + 1]
        outs = [kernels.feature_align(x[lo:hi], **params, process_group=dist.group.WORLD)[0] for _ in range(2)]
        verdicts = dict(self_check.verdicts)
        torch.save(dict(y=outs, verdicts=verdicts), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_kernel_wrong_on_one_rank_makes_every_rank_use_the_reference(tmp_path):
    """The ranks' collectives pair up only if all run the same backend: the verdict is the
    group's."""
    x, params = random_tokens(13, 24, torch.float32, seed=50).cpu(), align_params(24, seed=51)
    mp.spawn(_check_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path), x, params), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    y_ref = kernels.feature_align(x, **params, backend="torch")[0]
    for i in range(2):  # the reference's rows (the miscompiled kernel is 1% off)
        assert_close(torch.cat([ranks[0]["y"][i], ranks[1]["y"][i]]), y_ref, 1e-5, f"call {i} y")
    (key, problem0), = ranks[0]["verdicts"].items()
    (_, problem1), = ranks[1]["verdicts"].items()
    assert key[0] == "feature alignment"
    assert problem0 == "it disagrees on another rank" and problem1.startswith("y off")


def test_self_check_prints_each_kernels_verdict(auto_triton, monkeypatch, capsys):
    """What `make gpu-check` runs (at training size there): both kernels through "auto", a line
    each."""
    device = torch.empty(0, device=DEVICE).device
    assert self_check.check_device(device, tokens=40, width=32)
    name = self_check.device_name(device)
    assert capsys.readouterr().out == "".join(f"{kernel} on {name}: the Triton kernel agrees with the PyTorch "
                                              f"reference\n" for kernel in ("cache update", "feature alignment"))
    from kernels import triton_cache_update
    real = triton_cache_update.cache_partials
    monkeypatch.setattr(triton_cache_update, "cache_partials",
                        lambda *a: (lambda m, s, c: (m + 1, s, c))(*real(*a)))
    monkeypatch.setattr(self_check, "verdicts", {})
    assert not self_check.check_device(device, tokens=40, width=32)
    assert "cache update on " + name + ": col_max off by" in capsys.readouterr().out
