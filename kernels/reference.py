"""PyTorch reference for the two TextRefiner operations (textrefiner.py's docstring has their equations).

This is the only PyTorch implementation of them: backend "torch" dispatches here, it is
the CPU path, and the tests use it as the oracle for the Triton kernels. Everything is
computed in fp32 with autocast disabled, whatever the caller's autocast context.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


# ----------------------------------------------------------------------------- cache update

def cache_partials(tokens, cache):
    """One shard's partial cache-update results (see kernels.cache_partials)."""
    with torch.autocast(tokens.device.type, enabled=False):
        x_hat = F.normalize(tokens.float(), dim=-1)  # (N, D)
        scores = x_hat @ cache.t()  # (N, M)
        assign = scores.argmax(dim=1)  # (N,) ties -> lowest slot index
        col_max = scores.max(dim=0).values  # (M,) over every row, assigned or not
        weight = torch.exp(scores.gather(1, assign[:, None])[:, 0] - col_max[assign])  # (N,)
        # one-hot matmul instead of index_add_: deterministic on every device
        one_hot = F.one_hot(assign, cache.shape[0]).to(torch.float32)  # (N, M)
        slot_sums = (one_hot * weight[:, None]).t() @ x_hat  # (M, D)
        slot_counts = one_hot.sum(dim=0)  # (M,)
    return col_max, slot_sums, slot_counts


def cache_apply(cache, slot_sums, slot_counts, momentum):
    """Momentum update of the slots that received a token, then row L2-normalisation."""
    with torch.autocast(cache.device.type, enabled=False):
        moved = momentum * cache + (1.0 - momentum) * slot_sums  # (M, D)
        new = torch.where((slot_counts > 0)[:, None], moved, cache)  # (M, D)
        return F.normalize(new, dim=-1)


# ----------------------------------------------------------------------- feature alignment

class AllReduceSum(torch.autograd.Function):
    """Differentiable SUM all-reduce: the gradient of a summed statistic is the summed
    gradient, so every rank's backward sees the contributions of every rank's loss."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _group_sum(tensor, group):
    return tensor if group is None else AllReduceSum.apply(tensor, group)


def feature_align(x, w1, b1, gamma, beta, w2, b2, eps, process_group=None):
    """Linear -> BatchNorm1d (batch statistics) -> ReLU -> Linear, in fp32: x (N, D_in),
    w1 (D_hid, D_in), w2 (D_out, D_hid); square (CoOp) or not (PromptKD 512 -> 768 -> 768).

    With a process group the column statistics are those of the concatenated global batch
    (two-pass mean then centred second moment, each summed over the group), and autograd
    flows through the sums, which gives SyncBatchNorm's backward.
    """
    with torch.autocast(x.device.type, enabled=False):
        h = F.linear(x.float(), w1, b1)  # (N, D_hid)
        count = float(h.shape[0])
        if process_group is not None:  # global count, filled on the device: no blocking host copy
            count = torch.full((1,), count, device=h.device)
            dist.all_reduce(count, op=dist.ReduceOp.SUM, group=process_group)
        mean = _group_sum(h.sum(dim=0), process_group) / count  # (D_hid,)
        centred = h - mean  # (N, D_hid)
        var = _group_sum((centred * centred).sum(dim=0), process_group) / count  # (D_hid,) biased
        z = torch.relu(centred * torch.rsqrt(var + eps) * gamma + beta)  # (N, D_hid)
        y = F.linear(z, w2, b2)  # (N, D_out)
    # the statistics are returned for the caller's running-stat update, not differentiated
    return y, mean.detach(), var.detach()
