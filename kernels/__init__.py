"""TextRefiner's custom operations: the cache update and the feature alignment, fused
Triton kernels on CUDA with this PyTorch reference on the CPU and as the tests' oracle.

    from kernels import cache_update, cache_partials, cache_apply, feature_align

backend: "auto" (Triton for CUDA tensors, the PyTorch reference otherwise and for a cache
larger than the Triton kernel supports), "triton" (a ValueError for what it cannot take), or
"torch". The Triton modules (triton_cache_update, triton_feature_align) are imported on first
use, so the reference path needs no triton install, and importing never touches a GPU. On a
CPU, backend="triton" needs TRITON_INTERPRET=1 set before that first use. Under "auto" each
kernel's first Triton call on a device is checked against the reference (kernels/self_check.py).
Benchmark: `python -m kernels.bench` (CUDA only).
"""
import contextlib
import importlib
import os

import torch
import torch.distributed as dist

from kernels import reference, self_check

BACKENDS = ("auto", "triton", "torch")
# Device types on which "auto" runs Triton (the tests add "cpu": the CUDA path in the interpreter).
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
            if backend == "triton" or self_check.check_kernel(
                    "cache update", tokens.device, (tokens, cache),
                    lambda: self_check.cache_mismatch(partials, tokens, cache)):
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
    tokens are this rank's shard and the partials are combined over the group (exactly: the
    sums are rescaled to the global column maxima), so every rank returns the cache of one
    process on the concatenated tokens.

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
            if backend == "triton" or self_check.check_kernel(
                    "feature alignment", x.device, tensors,
                    lambda: self_check.align_mismatch(align, tensors, eps, process_group),
                    process_group):
                return align(*tensors, eps, process_group=process_group)
    return reference.feature_align(*tensors, eps, process_group=process_group)
