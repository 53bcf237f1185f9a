"""Triton cache-update partials: kernels.cache_partials(..., backend="triton").

With X = L2-normalise(tokens) (N, D), S = X @ cache^T (N, M), a_n = argmax_m S[n, m]
(ties -> lowest m, like torch.argmax) and c_m = max_n S[n, m]:
    col_max[m]     = c_m
    slot_sums[m]   = sum_{n: a_n = m} exp(S[n, m] - c_m) * X_n
    slot_counts[m] = |{n: a_n = m}|
kernels.cache_apply then does the momentum step and row normalisation (M x D, tiny).

Two passes over the tokens, no floating-point atomics:
  1. _cache_scores_kernel, one program per BLOCK_N rows: row norms and scores against all
     M cache rows (M padded to a power of two >= 16, for tl.dot), row argmax, the row's best
     score, and this block's column maxima. The column maximum is then the max over the
     blocks (exact in any order).
  2. _slot_sums_kernel, a split-K one-hot matmul: program (split, d-block) accumulates
     W^T @ X over its contiguous row range, W[n, m] = [a_n = m] exp(S[n, a_n] - c_m) / |x_n|,
     into its own (M_PAD, BLOCK_D) slice of a partial buffer; the splits are summed in a
     fixed order afterwards.

Offsets: N x D passes 2^31 elements at a few million tokens, so the offset of a block's rows is
int64 (from the program id in pass 1, carried in an int64 pointer along a split in pass 2); the
offsets within a block stay int32, as the launcher passes the tokens contiguous.

The multi-rank combine of these partials (exact) is kernels.cache_update(..., process_group=...).
"""
import torch
import triton
import triton.language as tl

NORM_EPS = 1e-12  # as torch.nn.functional.normalize
BLOCK_N = 32  # token rows per program
MAX_SPLITS = 64  # row ranges of the second pass; bounds the partial buffer to 64 * M_PAD * D
# M_PAD -> (BLOCK_D, num_warps) for both kernels. Both hold an (M_PAD, BLOCK_D) cache or sum
# tile, so a larger cache gets a narrower D step; chosen with tests/test_kernels_compile.py's
# ptxas report: no register spills on sm_80 or sm_90 for fp32 and bf16 tokens, and shared
# memory that would still fit one more pipeline stage (BLOCK_D 128 at M_PAD 128 needed
# 160 KiB, 3 KB under A100's limit, and spilled).
TILES = {16: (64, 4), 32: (64, 4), 64: (64, 8), 128: (32, 4)}


@triton.jit
def _cache_scores_kernel(
    x_ptr,  # (N, D) tokens, fp32/fp16/bf16, not normalised
    cache_ptr,  # (M, D) fp32 cache
    assign_ptr,  # (N,) int32 out: a_n
    best_ptr,  # (N,) fp32 out: S[n, a_n]
    inv_norm_ptr,  # (N,) fp32 out: 1 / max(|x_n|, eps)
    block_max_ptr,  # (num_blocks, M_PAD) fp32 out: this block's column maxima (-inf padding)
    N, M, D,
    stride_xn, stride_xd,
    stride_cm, stride_cd,
    EPS: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 row offsets (module docstring)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    slots = tl.arange(0, M_PAD)
    row_ok = rows < N
    slot_ok = slots < M

    dots = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        c_t = tl.load(cache_ptr + slots[None, :] * stride_cm + cols[:, None] * stride_cd,
                      mask=slot_ok[None, :] & col_ok[:, None], other=0.0)  # (BLOCK_D, M_PAD)
        # ieee: tf32 would flip near-tied argmaxes relative to the fp32 reference
        dots = tl.dot(x, c_t, dots, input_precision="ieee")
        sumsq += tl.sum(x * x, axis=1)

    inv_norm = 1.0 / tl.maximum(tl.sqrt(sumsq), EPS)
    scores = dots * inv_norm[:, None]  # (BLOCK_N, M_PAD) = S rows of this block
    scores = tl.where(slot_ok[None, :], scores, float("-inf"))
    best = tl.max(scores, axis=1)
    assign = tl.argmax(scores, axis=1, tie_break_left=True)
    tl.store(assign_ptr + rows, assign.to(tl.int32), mask=row_ok)
    tl.store(best_ptr + rows, best, mask=row_ok)
    tl.store(inv_norm_ptr + rows, inv_norm, mask=row_ok)

    col_max = tl.max(tl.where(row_ok[:, None], scores, float("-inf")), axis=0)
    tl.store(block_max_ptr + pid * M_PAD + slots, col_max)


@triton.jit
def _slot_sums_kernel(
    x_ptr,  # (N, D) tokens, fp32/fp16/bf16
    assign_ptr,  # (N,) int32: a_n
    best_ptr,  # (N,) fp32: S[n, a_n]
    inv_norm_ptr,  # (N,) fp32: 1 / max(|x_n|, eps)
    col_max_ptr,  # (M_PAD,) fp32: c_m
    part_sums_ptr,  # (num_splits, M_PAD, D) fp32 out: this split's sum of w_n * X_n per slot
    part_counts_ptr,  # (num_splits, M_PAD) fp32 out: this split's assigned-row count per slot
    N, D,
    rows_per_split,
    stride_xn, stride_xd,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    split = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    slots = tl.arange(0, M_PAD)
    block_rows = tl.arange(0, BLOCK_N)

    acc = tl.zeros((M_PAD, BLOCK_D), dtype=tl.float32)
    counts = tl.zeros((M_PAD,), dtype=tl.float32)
    row_start = split * rows_per_split
    x_block = x_ptr + row_start.to(tl.int64) * stride_xn  # the block's first row, in int64
    for r0 in range(row_start, row_start + rows_per_split, BLOCK_N):
        rows = r0 + block_rows
        row_ok = rows < N
        assign = tl.load(assign_ptr + rows, mask=row_ok, other=-1)  # -1 matches no slot
        best = tl.load(best_ptr + rows, mask=row_ok, other=0.0)
        inv_norm = tl.load(inv_norm_ptr + rows, mask=row_ok, other=0.0)
        c = tl.load(col_max_ptr + assign, mask=row_ok, other=0.0)
        weight = tl.exp(best - c) * inv_norm  # normalisation folded into the weight
        hit = assign[:, None] == slots[None, :]  # (BLOCK_N, M_PAD) one-hot
        w = tl.where(hit, weight[:, None], 0.0)
        x = tl.load(x_block + block_rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(w), x, acc, input_precision="ieee")
        counts += tl.sum(hit.to(tl.float32), axis=0)
        x_block += BLOCK_N * stride_xn

    tl.store(part_sums_ptr + split * M_PAD * D + slots[:, None] * D + cols[None, :], acc,
             mask=col_ok[None, :])
    tl.store(part_counts_ptr + split * M_PAD + slots, counts, mask=pid_d == 0)


def cache_partials(tokens, cache):
    """Triton cache_partials; inputs already validated by kernels.cache_partials."""
    tokens = tokens.contiguous()  # rows of D elements: offsets within a block stay small
    n, d = tokens.shape
    m = cache.shape[0]  # at most kernels.TRITON_MAX_CACHE_SIZE: scores stay in registers
    m_pad = max(16, triton.next_power_of_2(m))
    block_d, num_warps = TILES[m_pad]
    block_d = min(block_d, max(16, triton.next_power_of_2(d)))
    num_blocks = triton.cdiv(n, BLOCK_N)
    dev = tokens.device
    assign = torch.empty(n, dtype=torch.int32, device=dev)
    best = torch.empty(n, dtype=torch.float32, device=dev)
    inv_norm = torch.empty(n, dtype=torch.float32, device=dev)
    block_max = torch.empty(num_blocks, m_pad, dtype=torch.float32, device=dev)
    _cache_scores_kernel[(num_blocks,)](
        tokens, cache, assign, best, inv_norm, block_max,
        n, m, d,
        tokens.stride(0), tokens.stride(1),
        cache.stride(0), cache.stride(1),
        EPS=NORM_EPS, M_PAD=m_pad, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    col_max = block_max.amax(dim=0)  # (M_PAD,) max is exact, so the order cannot matter

    num_splits = min(num_blocks, MAX_SPLITS)
    rows_per_split = triton.cdiv(num_blocks, num_splits) * BLOCK_N
    num_splits = triton.cdiv(n, rows_per_split)
    part_sums = torch.empty(num_splits, m_pad, d, dtype=torch.float32, device=dev)
    part_counts = torch.empty(num_splits, m_pad, dtype=torch.float32, device=dev)
    _slot_sums_kernel[(num_splits, triton.cdiv(d, block_d))](
        tokens, assign, best, inv_norm, col_max, part_sums, part_counts,
        n, d, rows_per_split,
        tokens.stride(0), tokens.stride(1),
        M_PAD=m_pad, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    # fixed-order sum over the splits: deterministic run to run
    return col_max[:m], part_sums.sum(dim=0)[:m], part_counts.sum(dim=0)[:m]
