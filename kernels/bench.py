"""Benchmark the Triton kernels against the PyTorch reference (and the cache update against a
slot-by-slot loop as the released TextRefiner code does it) on a CUDA device.

    python -m kernels.bench                 # print the table and write it into kernels/README.md
    python -m kernels.bench --no-write --dtype bfloat16

Shapes: N = 32*197 and 256*197 tokens (batch 32 / 256 of ViT-B/16), D = 512 and 768, M = 25;
and PromptKD's alignment, 512 -> 768 -> 768 at N = 8*197 (its batch of 8) and
32*197, with dx (the student's deep visual prompts train through it).
GB/s is measured against the bytes the operation cannot avoid moving (its inputs and outputs
once), so it is comparable across implementations, not the traffic each one really causes.
"""
import argparse
import os
import re
import statistics
import sys

import torch
import torch.nn.functional as F
import triton

import kernels

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# TIMED_ROUNDS is a multiple of 2 and 3, so with 2 or 3 implementations each takes each place
# equally often
WARMUP_ROUNDS, TIMED_ROUNDS = 5, 30


def cuda_event_ms(fn):
    """Wall time of one fn() in milliseconds, measured with CUDA events (synchronised)."""
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop)


def time_interleaved(steps, timer=cuda_event_ms, warmup=WARMUP_ROUNDS, rounds=TIMED_ROUNDS):
    """Median time of each of steps {name: fn}: every step runs `warmup` times first, then the
    steps alternate within every round, the order rotating from round to round (so each takes
    each position equally often) and a busy GPU slows all of them alike. timer(fn) runs fn
    once and returns its time. -> {name: median ms over the rounds}."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timer(steps[name]))
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def loop_cache_update(tokens, cache, momentum=0.8):
    """The cache update the way the released code computes it: a softmax over the rows of every
    column, divided by the column's maximum, then one masked update per slot."""
    x_hat = F.normalize(tokens.float(), dim=-1)  # (N, D)
    scores = x_hat @ cache.t()  # (N, M)
    assign = scores.argmax(dim=1)  # (N,)
    prob = scores.softmax(dim=0)  # (N, M)
    weight = prob / prob.max(dim=0, keepdim=True).values  # (N, M) = exp(S - colmax)
    new = cache.clone()
    for m in range(cache.shape[0]):
        rows = (assign == m).nonzero()[:, 0]
        if rows.numel() > 0:
            weighted = (weight[rows, m, None] * x_hat[rows]).sum(dim=0)  # (D,)
            new[m] = momentum * cache[m] + (1 - momentum) * weighted
    return F.normalize(new, dim=-1)


def bench_cache(n, d, m, dtype):
    tokens = torch.randn(n, d, device="cuda").add_(0.3).to(dtype)
    cache = F.normalize(torch.rand(m, d, device="cuda"), dim=-1)
    moved = n * d * tokens.element_size() + 2 * m * d * 4  # tokens in, cache in and out
    ms = time_interleaved({
        "triton": lambda: kernels.cache_update(tokens, cache, backend="triton"),
        "torch": lambda: kernels.cache_update(tokens, cache, backend="torch"),
        "loop": lambda: loop_cache_update(tokens, cache),
    })
    return dict(op="cache_update", n=n, d=d, mode="fwd", ms=ms, bytes=moved)


def bench_align(n, d, dtype, backward, d_hid=None, needs_dx=False):
    """Linear(d, d_hid) -> BN -> ReLU -> Linear(d_hid, d_hid); square unless d_hid is given.
    needs_dx: x requires grad (PromptKD's prompted student tokens), else frozen CLIP tokens."""
    d_hid = d if d_hid is None else d_hid
    x = torch.randn(n, d, device="cuda").to(dtype).requires_grad_(backward and needs_dx)
    w1, w2 = torch.randn(d_hid, d) / d ** 0.5, torch.randn(d_hid, d_hid) / d_hid ** 0.5
    b1, beta, b2 = torch.zeros(d_hid), torch.zeros(d_hid), torch.zeros(d_hid)
    gamma = torch.ones(d_hid)
    params = [t.to("cuda") for t in (w1, b1, gamma, beta, w2, b2)]
    for p in params:
        p.requires_grad_(backward)
    dy = torch.randn(n, d_hid, device="cuda")
    # x and y once, both weights; backward adds dy in, both weight gradients (and dx) out
    weights = (d_hid * d + d_hid * d_hid) * 4
    moved = n * d * x.element_size() + n * d_hid * 4 + weights
    if backward:
        moved += n * d_hid * 4 + weights + (n * d * x.element_size() if needs_dx else 0)

    def run(backend):
        def step():
            y = kernels.feature_align(x, *params, backend=backend)[0]
            if backward:
                torch.autograd.backward(y, dy)
        return step

    ms = time_interleaved({backend: run(backend) for backend in ("triton", "torch")})
    mode = ("fwd+bwd+dx" if needs_dx else "fwd+bwd") if backward else "fwd"
    width = d if d_hid == d else f"{d}->{d_hid}"
    return dict(op="feature_align", n=n, d=width, mode=mode, ms=ms, bytes=moved)


def table(rows, dtype):
    lines = [f"tokens/x dtype {dtype}; M = 25; medians of {TIMED_ROUNDS} rounds after "
             f"{WARMUP_ROUNDS} warm-up rounds, the implementations alternating in every round "
             "(order rotating); ratios of the medians",
             "",
             "| op | N | D | pass | Triton ms | torch ms | loop ms | vs torch | vs loop | Triton GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        loop_ms, vs_loop = "-", "-"
        if "loop" in ms:
            loop_ms, vs_loop = f"{ms['loop']:.3f}", f"{ms['loop'] / ms['triton']:.2f}x"
        speed = r["bytes"] / ms["triton"] / 1e6  # GB/s
        lines.append(
            f"| {r['op']} | {r['n']} | {r['d']} | {r['mode']} | {ms['triton']:.3f} | "
            f"{ms['torch']:.3f} | {loop_ms} | {ms['torch'] / ms['triton']:.2f}x | {vs_loop} | "
            f"{speed:.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="token dtype (TextRefiner feeds fp32 aligned tokens to the cache)")
    parser.add_argument("--no-write", action="store_true",
                        help="print only; leave kernels/README.md as it is")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels/bench.py: needs a CUDA device and none was found; nothing measured "
                 "(the CPU tests are `python -m pytest tests/test_kernels.py`)")
    dtype = getattr(torch, args.dtype)
    rows = []
    for n in (32 * 197, 256 * 197):
        for d in (512, 768):
            rows.append(bench_cache(n, d, 25, dtype))
            rows.append(bench_align(n, d, dtype, backward=False))
            rows.append(bench_align(n, d, dtype, backward=True))
            print(f"done N={n} D={d}", file=sys.stderr)
    for n in (8 * 197, 32 * 197):  # PromptKD: batch 8 (its recipe) and 32
        rows.append(bench_align(n, 512, dtype, backward=False, d_hid=768))
        rows.append(bench_align(n, 512, dtype, backward=True, d_hid=768, needs_dx=True))
        print(f"done PromptKD N={n} D=512->768", file=sys.stderr)
    header = (f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton "
              f"{triton.__version__}; CUDA {torch.version.cuda}")
    text = header + "\n\n" + table(rows, args.dtype)
    print(text)
    if not args.no_write:
        with open(README) as f:
            readme = f.read()
        if BEGIN not in readme or END not in readme:
            sys.exit(f"kernels/bench.py: {README} lacks the {BEGIN} ... {END} markers")
        section = re.escape(BEGIN) + ".*?" + re.escape(END)
        readme = re.sub(section, lambda _: f"{BEGIN}\n{text}\n{END}", readme, flags=re.S)
        with open(README, "w") as f:
            f.write(readme)
        print(f"written into {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
