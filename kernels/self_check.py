"""The self-check of backend="auto": a kernel's first Triton call on a device is compared once
with the PyTorch reference on the same inputs (check_kernel), at the tolerances of the kernel
tests' large inputs. If they disagree, or the Triton call raises, one line on stderr names the
device and the kernel, and that kernel runs the reference on that device for the rest of the
process: a kernel miscompiled on (or not buildable for) a GPU never seen before can neither
silently train a wrong model nor stop the run. `verdicts` holds the outcomes; later calls pay
a dict lookup, no device synchronisation. backend="triton" (tests, benchmarks) is never replaced.
check_device(torch.device("cuda")) checks both kernels at training size (`make gpu-check`).
"""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels
from kernels import reference

# The kernel tests' tolerances at training sizes (tests/test_kernels.py, the large cases): the
# largest error within tol * max(1, largest reference value), per output; gradients 1e-4 (dx of
# fp16/bf16 tokens, rounded to their dtype, 1e-2).
CHECK_TOLERANCES = dict(col_max=1e-5, slot_sums=1e-4, y=1e-4, mean=1e-5, var=1e-4, gradient=1e-4,
                        low_precision_dx=1e-2)
# Two correct kernels sum in other orders (scores, pre-activations ~5e-6 apart at training sizes):
# a token whose best two slots lie within CHECK_MARGIN may be argmaxed either way, and a ReLU gate
# whose input lies within CHECK_MARGIN (times |gamma| when larger) of 0 opened on one side only,
# moving a gradient by a whole term. The check leaves such tokens out and moves beta off such gates.
CHECK_MARGIN = 1e-4
KERNELS = ("cache update", "feature alignment")
verdicts = {}  # (kernel, device) -> None where Triton agreed, else what differed


def device_name(device):
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} (Triton interpreter)"


def check_kernel(kernel, device, inputs, compare, process_group=None):
    """Whether "auto" may run the Triton `kernel` on `device`. The first call whose `inputs` are all
    finite (across process_group: every rank decides alike) records compare() -> None when Triton
    agrees with the reference on them, else what differs; a Triton call that raises fails the
    check as a disagreement does. A failed check is one line on stderr."""
    key = (kernel, device)
    if key not in verdicts:
        finite = torch.stack([torch.isfinite(t).all() for t in inputs]).all().float()[None]
        if process_group is not None:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=process_group)
        if not finite.item():  # NaN compares unequal even to itself: check a later batch
            return False
        failure = "disagrees with the PyTorch reference"
        try:
            problem = compare()
        except Exception as error:  # cannot build or launch here: as unusable as a wrong kernel
            failure, problem = "raised", f"{type(error).__name__}: {' '.join(str(error).split())}"
        if process_group is not None:  # one backend on every rank: their collectives must pair up
            flag = torch.full((1,), float(problem is not None), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=process_group)
            problem = problem or ("it disagrees on another rank" if flag.item() else None)
        verdicts[key] = problem
        if problem:
            print(f"warning: the Triton {kernel} kernel {failure} on {device_name(device)}: "
                  f"{problem}; using the reference for the rest of this run", file=sys.stderr)
    return verdicts[key] is None


def check_device(device, tokens=32 * 197, width=512):
    """Both kernels once under "auto" on random inputs of training size on `device` (CoOp's batch
    of 32 ViT-B/16 images: 32 x 197 tokens of 512, 25 cache slots), so that each is checked; one
    line per verdict on stdout. -> True when every kernel agrees with the reference."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(tokens, width, generator=g) + 0.3).to(device)
    cache = F.normalize(torch.rand(25, width, generator=g), dim=-1).to(device)
    kernels.cache_update(x, cache)
    params = [torch.randn(width, width, generator=g) / width**0.5,  # w1
              0.1 * torch.randn(width, generator=g),  # b1
              1 + 0.1 * torch.randn(width, generator=g),  # gamma
              0.1 * torch.randn(width, generator=g),  # beta
              torch.randn(width, width, generator=g) / width**0.5,  # w2
              0.1 * torch.randn(width, generator=g)]  # b2
    kernels.feature_align(x, *(p.to(device) for p in params))
    agrees = "the Triton kernel agrees with the PyTorch reference"
    unchecked = "not checked (the reference runs for these inputs)"
    for kernel in KERNELS:
        problem = verdicts.get((kernel, x.device), unchecked)
        print(f"{kernel} on {device_name(x.device)}: {agrees if problem is None else problem}")
    return all(verdicts.get((kernel, x.device), True) is None for kernel in KERNELS)


def _mismatch(name, actual, expected, tol):
    """None if |actual - expected| <= tol * max(1, max |expected|) everywhere, else what differs."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    error = (actual.float() - expected.float()).abs().max().item() if expected.numel() else 0.0
    if error <= tol * scale:
        return None
    return f"{name} off by {error:.3g} (tolerance {tol:g} x {scale:.3g})"


def cache_mismatch(triton_partials, tokens, cache):
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
    gamma + beta of this batch (the group's statistics) lies within the margin of 0. The
    statistics do not depend on beta: the check runs the kernels' code on the same batch, with
    every gate clear."""
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


def align_mismatch(triton_align, tensors, eps, process_group):
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
