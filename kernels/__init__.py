"""TextRefiner's custom operations: the cache update and the feature alignment, fused
Triton kernels on CUDA with this PyTorch reference on the CPU and as the tests' oracle.

    from kernels import cache_update, cache_partials, cache_apply, feature_align

backend: "auto" (Triton for CUDA tensors, the PyTorch reference otherwise and for a cache
larger than the Triton kernel supports), "triton" (a ValueError for what it cannot take), or
"torch". The Triton modules (triton_cache_update, triton_feature_align) are imported on first
use, so the reference path needs no triton install, and importing never touches a GPU. On a
CPU, backend="triton" needs TRITON_INTERPRET=1 set before that first use. Benchmark:
`python -m kernels.bench` (CUDA only).

Self-check: under "auto", a kernel's first Triton call on a device is compared once with the
reference on the same inputs (check_kernel, at the tolerances of the kernel tests' large inputs;
verdicts() has the outcomes). If they disagree, one line on stderr names the device and the
kernel, and that kernel runs the reference on that device for the rest of the process: a kernel
miscompiled on a GPU never seen before cannot silently train a wrong model. Later calls pay a
dict lookup, no device synchronisation. backend="triton" (tests, benchmarks) is never replaced.

Multi-rank cache update (every rank ends with the identical cache), what
cache_update(local_tokens, cache, momentum, process_group=group) does:
    col_max, sums, counts = cache_partials(local_tokens, cache)
    g = col_max.clone(); all_reduce(g, MAX)
    sums *= torch.exp(col_max - g)[:, None]      # rescale to the global column maxima
    all_reduce(sums, SUM); all_reduce(counts, SUM)
    cache = cache_apply(cache, g, sums, counts, momentum)
A rank without tokens joins these sums with nothing (col_max -inf, zero sums and counts).
A batch with a non-finite token on any rank leaves the cache as it was (cache_update).
"""
import contextlib
import importlib
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels import reference

BACKENDS = ("auto", "triton", "torch")
# Device types on which "auto" runs Triton (the tests add "cpu" to run the CUDA path in the interpreter).
TRITON_DEVICE_TYPES = ("cuda",)
# The Triton cache update keeps a token block's whole score row (M padded to a power of
# two) in registers; beyond this the "auto" backend uses the reference instead.
TRITON_MAX_CACHE_SIZE = 128


def on_device(device):
    """Context for Triton launches on tensors of `device`: Triton launches on the current
    CUDA device and its stream, not on the tensors' (train.py --device cuda:1 without
    torchrun never makes cuda:1 current), so the launchers make the tensors' device current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _use_triton(backend, device, triton_supports=True, why_not=""):
    """Whether to run the Triton kernel for tensors on `device`. triton_supports says whether
    the kernel handles these inputs: if not, "auto" picks the reference and "triton" raises
    ValueError(why_not)."""
    if backend not in BACKENDS:
        raise ValueError(f"kernels: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("kernels: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 "
                             "set before the first Triton call (CPU interpreter)")
        if not triton_supports:
            raise ValueError(why_not)
        return True
    return backend == "auto" and device.type in TRITON_DEVICE_TYPES and triton_supports


def _cache_uses_triton(backend, device, cache_size):
    """_use_triton for the cache update, whose Triton kernel holds at most TRITON_MAX_CACHE_SIZE
    rows in registers: "auto" falls back to the reference."""
    return _use_triton(backend, device, cache_size <= TRITON_MAX_CACHE_SIZE,
                       f"kernels.cache_partials: backend='triton' supports a cache of at most "
                       f"{TRITON_MAX_CACHE_SIZE} rows, got M={cache_size}; "
                       f"use backend='auto' or 'torch'")


def _triton_module(name):
    """kernels.<name>, imported on first use: triton ships for Linux only, and the CPU
    reference path must work without it."""
    try:
        return importlib.import_module(f"kernels.{name}")
    except ModuleNotFoundError as error:
        if error.name != "triton":
            raise
        raise ModuleNotFoundError("kernels: the Triton backend needs the triton package "
                                  "(pip install triton); backend='torch' runs without it") from error


# ----------------------------------------------------------------------------- self-check

# The kernel tests' tolerances at training sizes (tests/test_kernels.py, the large cases): the
# largest error within tol * max(1, largest reference value), per output; gradients 1e-4 (dx of
# fp16/bf16 tokens, rounded to their dtype, 1e-2).
CHECK_TOLERANCES = dict(col_max=1e-5, slot_sums=1e-4, y=1e-4, mean=1e-5, var=1e-4, gradient=1e-4,
                        low_precision_dx=1e-2)
# Two correct kernels sum in other orders (scores, pre-activations ~5e-6 apart at training sizes):
# a token whose best two slots lie within CHECK_MARGIN may be argmaxed either way, and a ReLU gate
# whose input lies within CHECK_MARGIN (times |gamma| when larger) of 0 opened on one side only,
# moving a gradient by a whole term. The check leaves such tokens out, and moves beta off such gates.
CHECK_MARGIN = 1e-4
_verdicts = {}  # (kernel, device) -> None (agrees) or what differed


def verdicts():
    """{(kernel name, device): None where its Triton kernel agreed with the reference, else what
    differed (that kernel then runs the reference on that device)} for the kernels checked so far."""
    return dict(_verdicts)


def device_name(device):
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} (Triton interpreter)"


def check_kernel(kernel, device, inputs, compare, process_group=None):
    """Whether "auto" may run the Triton `kernel` on `device`. The first call whose `inputs` are all
    finite (across process_group: every rank decides alike) records compare() -> None when Triton
    agrees with the reference on them, else what differs; a disagreement is one line on stderr."""
    key = (kernel, device)
    if key not in _verdicts:
        finite = torch.stack([torch.isfinite(t).all() for t in inputs]).all().float()[None]
        if process_group is not None:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=process_group)
        if not finite.item():  # NaN compares unequal even to itself: check a later batch
            return False
        problem = compare()
        if process_group is not None:  # one backend on every rank: their collectives must pair up
            flag = torch.full((1,), float(problem is not None), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=process_group)
            problem = problem or ("it disagrees on another rank" if flag.item() else None)
        _verdicts[key] = problem
        if problem:
            print(f"warning: the Triton {kernel} kernel disagrees with the PyTorch reference on "
                  f"{device_name(device)}: {problem}; using the reference for the rest of this run", file=sys.stderr)
    return _verdicts[key] is None


def self_check(device, tokens=32 * 197, width=512):
    """Both kernels once under "auto" on random inputs of training size on `device` (CoOp's batch of
    32 ViT-B/16 images: 32 x 197 tokens of 512, 25 cache slots), so that each is checked; one line
    per verdict on stdout. -> True when every kernel agrees with the reference (`make gpu-check`)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(tokens, width, generator=g) + 0.3).to(device)
    cache = F.normalize(torch.rand(25, width, generator=g), dim=-1).to(device)
    cache_update(x, cache)
    params = [torch.randn(width, width, generator=g) / width**0.5, 0.1 * torch.randn(width, generator=g),
              1 + 0.1 * torch.randn(width, generator=g), 0.1 * torch.randn(width, generator=g),
              torch.randn(width, width, generator=g) / width**0.5, 0.1 * torch.randn(width, generator=g)]
    feature_align(x, *(p.to(device) for p in params))
    for kernel in ("cache update", "feature alignment"):
        problem = _verdicts.get((kernel, x.device), "not checked (the reference runs for these inputs)")
        print(f"{kernel} on {device_name(x.device)}: "
              f"{'the Triton kernel agrees with the PyTorch reference' if problem is None else problem}")
    return all(_verdicts.get((kernel, x.device), True) is None for kernel in ("cache update", "feature alignment"))


def _mismatch(name, actual, expected, tol):
    """None if |actual - expected| <= tol * max(1, max |expected|) everywhere, else what differs."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    error = (actual.float() - expected.float()).abs().max().item() if expected.numel() else 0.0
    return None if error <= tol * scale else f"{name} off by {error:.3g} (tolerance {tol:g} x {scale:.3g})"


def _cache_mismatch(triton_partials, tokens, cache):
    """The Triton cache partials against the reference's on the tokens without a near-tied slot."""
    with torch.autocast(tokens.device.type, enabled=False):
        scores = F.normalize(tokens.float(), dim=-1) @ cache.t()  # (N, M)
    if cache.shape[0] > 1:
        top2 = scores.topk(2, dim=1).values
        clear = tokens[top2[:, 0] - top2[:, 1] > CHECK_MARGIN]
        tokens = clear if len(clear) else tokens
    got, want = triton_partials(tokens, cache), reference.cache_partials(tokens, cache)
    if not torch.equal(got[2], want[2]):
        return f"slot_counts differ by {int((got[2] - want[2]).abs().sum().item())} tokens"
    return (_mismatch("col_max", got[0], want[0], CHECK_TOLERANCES["col_max"])
            or _mismatch("slot_sums", got[1], want[1], CHECK_TOLERANCES["slot_sums"]))


def _beta_off_the_gates(tensors, eps, process_group):
    """beta moved per channel, in steps of the margin, until no pre-activation (h - mean) * rstd *
    gamma + beta of this batch (the group's statistics) lies within the margin of 0. The statistics
    do not depend on beta: the check runs the kernels' code on the same batch, with every gate clear."""
    x, w1, b1, gamma, beta, w2, b2 = tensors
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        _, mean, var = reference.feature_align(*tensors, eps, process_group=process_group)
        centred = (F.linear(x.float(), w1, b1) - mean) * torch.rsqrt(var + eps) * gamma  # (N, D_hid)
        step = CHECK_MARGIN * gamma.abs().clamp(min=1)
        beta = beta.detach().clone()
        for _ in range(100):  # a step clears about half of the channels left
            near = ((centred + beta).abs() < step).any(dim=0).float()  # (D_hid,)
            if process_group is not None:  # the same beta on every rank
                dist.all_reduce(near, op=dist.ReduceOp.MAX, group=process_group)
            if not near.any().item():
                break
            beta += near * step
    return beta


def _align_mismatch(triton_align, tensors, eps, process_group):
    """The Triton feature alignment against the reference on this batch with beta off the ReLU
    gates: outputs, and the gradients of every input for the same random dy (from a private
    generator: the run's random streams are left alone)."""
    tensors = (*tensors[:4], _beta_off_the_gates(tensors, eps, process_group), *tensors[5:])
    results = []
    for align in (triton_align, reference.feature_align):
        leaves = [t.detach().requires_grad_() for t in tensors]
        with torch.enable_grad():
            y, mean, var = align(*leaves, eps, process_group=process_group)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)) / max(1, y.shape[0]) ** 0.5
            results.append([y, mean, var, *torch.autograd.grad(y, leaves, dy.to(y.device))])
    low_precision_dx = tensors[0].dtype != torch.float32
    names = ("y", "mean", "var", "dx", "dw1", "db1", "dgamma", "dbeta", "dw2", "db2")
    for name, got, want in zip(names, *results):
        tol = CHECK_TOLERANCES["low_precision_dx" if name == "dx" and low_precision_dx else
                               "gradient" if name.startswith("d") else name]
        if problem := _mismatch(name, got, want, tol):
            return problem
    return None


def _check_cache_inputs(tokens, cache):
    if tokens.dim() != 2 or cache.dim() != 2 or tokens.shape[1] != cache.shape[1]:
        raise ValueError(f"kernels.cache_partials: expected tokens (N, D) and cache (M, D), "
                         f"got {tuple(tokens.shape)} and {tuple(cache.shape)}")
    if cache.shape[0] == 0:
        raise ValueError("kernels.cache_partials: need at least one cache row, got M=0")
    if tokens.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"kernels.cache_partials: tokens must be fp32/fp16/bf16, got {tokens.dtype}")
    if cache.dtype != torch.float32:
        raise TypeError(f"kernels.cache_partials: cache must be fp32, got {cache.dtype}")
    if tokens.device != cache.device:
        raise ValueError(f"kernels.cache_partials: tokens on {tokens.device}, cache on {cache.device}")


def cache_partials(tokens, cache, backend="auto"):
    """One shard's partial results of the cache update, all fp32.

    tokens (N, D) fp32/fp16/bf16, not yet normalised; cache (M, D) fp32. With
    X = normalise(tokens), S = X @ cache^T and a_n = argmax_m S[n, m] (ties -> lowest m):
      col_max (M,)       col_max[m] = max_n S[n, m] over all N rows of this shard
      slot_sums (M, D)   slot_sums[m] = sum_{n: a_n = m} exp(S[n, m] - col_max[m]) * X_n
      slot_counts (M,)   number of rows assigned to m, as float32
    N = 0 (a rank without tokens) gives col_max -inf and zero sums and counts: nothing.
    """
    _check_cache_inputs(tokens, cache)
    # decided first: a rank without tokens refuses a bad backend as the other ranks do
    use_triton = _cache_uses_triton(backend, tokens.device, cache.shape[0])
    if tokens.shape[0] == 0:
        m, d = cache.shape
        return cache.new_full((m,), float("-inf")), cache.new_zeros(m, d), cache.new_zeros(m)
    if use_triton:
        partials = _triton_module("triton_cache_update").cache_partials
        with on_device(tokens.device):
            if backend == "triton" or check_kernel("cache update", tokens.device, (tokens, cache),
                                                   lambda: _cache_mismatch(partials, tokens, cache)):
                return partials(tokens, cache)
    return reference.cache_partials(tokens, cache)


def cache_apply(cache, col_max, slot_sums, slot_counts, momentum=0.8):
    """cache[m] <- momentum * cache[m] + (1 - momentum) * slot_sums[m] where slot_counts[m] > 0,
    unchanged elsewhere; then every row L2-normalised. Returns a new (M, D) fp32 tensor.

    col_max is the (global) column maximum slot_sums was scaled against; it is only
    checked here, the sums already carry it.
    """
    m, d = cache.shape
    if (col_max.shape != (m,) or slot_sums.shape != (m, d) or slot_counts.shape != (m,)):
        raise ValueError(f"kernels.cache_apply: expected col_max ({m},), slot_sums ({m}, {d}), "
                         f"slot_counts ({m},) for cache {tuple(cache.shape)}, got "
                         f"{tuple(col_max.shape)}, {tuple(slot_sums.shape)}, {tuple(slot_counts.shape)}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"kernels.cache_apply: momentum must be in [0, 1], got {momentum}")
    return reference.cache_apply(cache, slot_sums, slot_counts, momentum)


def cache_update(tokens, cache, momentum=0.8, backend="auto", process_group=None):
    """The whole cache update: returns the new (M, D) fp32 cache. With process_group,
    tokens are this rank's shard and the partials are combined over the group (module
    docstring), so every rank returns the cache of one process on the concatenated tokens.

    If any token of the (group's) batch is not finite, the cache is returned unchanged on
    every rank: that is a step the fp16 gradient scaler skips, and one NaN or inf would
    otherwise poison a cache row for good. Decided on the device, no host sync; the flag
    rides on the counts' all_reduce, so all ranks decide alike."""
    col_max, slot_sums, slot_counts = cache_partials(tokens, cache, backend=backend)
    nonfinite = (~torch.isfinite(tokens)).any().to(slot_counts.dtype)[None]  # (1,) 1.0 if any
    if process_group is not None:
        local_max, col_max = col_max, col_max.clone()
        dist.all_reduce(col_max, op=dist.ReduceOp.MAX, group=process_group)
        # rescale to the global column maxima (a rank without tokens has -inf: factor 0)
        slot_sums *= torch.exp(local_max - col_max)[:, None]
        dist.all_reduce(slot_sums, op=dist.ReduceOp.SUM, group=process_group)
        counts_and_flag = torch.cat([slot_counts, nonfinite])  # (M + 1,)
        dist.all_reduce(counts_and_flag, op=dist.ReduceOp.SUM, group=process_group)
        slot_counts, nonfinite = counts_and_flag[:-1], counts_and_flag[-1:]
    new = cache_apply(cache, col_max, slot_sums, slot_counts, momentum)
    return torch.where(nonfinite > 0, cache, new)


def _check_align_inputs(x, w1, b1, gamma, beta, w2, b2, process_group):
    """The widths come from x (D_in), w1's rows (D_hid) and w2's rows (D_out); every other
    tensor must agree with them. A mismatch names the tensor and the shape it must have."""
    if x.dim() != 2:
        raise ValueError(f"kernels.feature_align: x must be (N, D_in), got {tuple(x.shape)}")
    n, d_in = x.shape
    if n < 1 and process_group is None:  # in a group, a rank without rows adds nothing
        raise ValueError("kernels.feature_align: need at least one row for batch statistics")
    if w1.dim() != 2 or w1.shape[1] != d_in:
        raise ValueError(f"kernels.feature_align: w1 must be (D_hid, {d_in}) for x of width D_in={d_in}, "
                         f"got {tuple(w1.shape)}")
    d_hid = w1.shape[0]
    if w2.dim() != 2 or w2.shape[1] != d_hid:
        raise ValueError(f"kernels.feature_align: w2 must be (D_out, {d_hid}) for w1 of {d_hid} rows "
                         f"(D_hid), got {tuple(w2.shape)}")
    d_out = w2.shape[0]
    widths = f"D_in={d_in}, D_hid={d_hid}, D_out={d_out}"
    expected = dict(w1=(d_hid, d_in), b1=(d_hid,), gamma=(d_hid,), beta=(d_hid,), w2=(d_out, d_hid), b2=(d_out,))
    given = dict(w1=w1, b1=b1, gamma=gamma, beta=beta, w2=w2, b2=b2)
    for name, shape in expected.items():
        t = given[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"kernels.feature_align: {name} must be {shape} for {widths}, got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise TypeError(f"kernels.feature_align: {name} must be fp32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"kernels.feature_align: {name} on {t.device}, x on {x.device}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"kernels.feature_align: x must be fp32/fp16/bf16, got {x.dtype}")


def feature_align(x, w1, b1, gamma, beta, w2, b2, eps=1e-5, backend="auto", process_group=None):
    """Linear(D_in, D_hid) -> BatchNorm1d(D_hid) with batch statistics -> ReLU ->
    Linear(D_hid, D_out), token-wise over x (N, D_in); w1 (D_hid, D_in), b1/gamma/beta
    (D_hid,), w2 (D_out, D_hid), b2 (D_out,). TextRefiner on CoOp is square (D, D, D); on
    PromptKD it is 512 -> 768 -> 768 (student tokens to teacher text).

    Returns (y (N, D_out) fp32, mean (D_hid,) fp32, var (D_hid,) fp32 biased) where mean/var
    are the batch statistics of the first Linear's output (the caller updates running stats;
    nn.BatchNorm1d uses the unbiased var for those). Differentiable w.r.t. x and all
    weights. With process_group, statistics and their backward reductions are summed over
    the group (SyncBatchNorm): mean/var are those of the concatenated global batch, and a
    rank may hold N = 0 rows (it adds nothing).
    """
    _check_align_inputs(x, w1, b1, gamma, beta, w2, b2, process_group)
    tensors = (x, w1, b1, gamma, beta, w2, b2)
    if _use_triton(backend, x.device):
        align = _triton_module("triton_feature_align").feature_align
        with on_device(x.device):
            if backend == "triton" or check_kernel("feature alignment", x.device, tensors,
                                                   lambda: _align_mismatch(align, tensors, eps, process_group),
                                                   process_group):
                return align(*tensors, eps, process_group=process_group)
    return reference.feature_align(*tensors, eps, process_group=process_group)
