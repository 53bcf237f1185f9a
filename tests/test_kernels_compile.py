"""Ahead-of-time compile every Triton kernel of kernels/ for real GPUs, without a GPU.

The CPU interpreter (TRITON_INTERPRET=1, set by conftest) accepts programs the GPU compiler
rejects (tl.dot below 16, operand dtype mismatches, ...), so the interpreter tests alone do
not show that the kernels build for a device. Here the real launchers run on CPU tensors
of realistic and of the CPU tests' shapes, with Triton's driver replaced by a stand-in
that names a GPU target and launches turned into warmups: each kernel is specialised
exactly as a real launch would specialise it (constexprs, dtypes, ints equal to 1 or
divisible by 16, pointer alignment, num_warps) and compiled through ptxas to a cubin, and
nothing is launched. The outputs the launchers compute between kernels are garbage, which
is harmless: only the launch arguments matter. ptxas's own report (-v, which Triton passes)
gives each kernel's registers, stack and spill bytes: no kernel may spill, and each must
leave room in shared memory for one more pipeline stage (Triton releases differ in how
many buffers the pipeliner allocates).

This runs in a subprocess per target, because triton.jit returns interpreter objects once
TRITON_INTERPRET=1 is set, and both targets compile in parallel. Run this file as a script
(`python tests/test_kernels_compile.py 90`) for one target's JSON report.
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

# On a CUDA machine the kernel tests compile and run every kernel for real, and the
# host's Triton may predate the launch internals this harness relies on.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CUDA present: tests/test_kernels.py compiles the kernels for real")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# compute capability -> the largest shared memory one block may opt into on that GPU
TARGETS = {
    90: 227 * 1024,  # H100 / H200
    80: 163 * 1024,  # A100
}
DTYPES = ("float32", "float16", "bfloat16")
REALISTIC_N = (32 * 197, 256 * 197)  # batches of 32 and 256 images x 197 ViT tokens
REALISTIC_D = (512, 768)
# Cache sizes: one per padded size M_PAD (16, 32, 64, 128: every size the Triton cache update
# accepts, 1..128, pads to one of them and gets its tiles), plus 128 itself (divisible by 16).
REALISTIC_M = (13, 25, 50, 100, 128)
# Every distinct specialisation costs 1-2 s of compiling (ptxas included), so: sm_90 gets
# every dtype of the realistic shapes, which reaches every kernel, matmul flag combination
# and dtype. The realistic N and D all share one specialisation per dtype (ints divisible
# by 16, the same tiles), so sweeping them is nearly free. sm_80 gets the model's path
# (fp32 tokens: FeatureAlign widens them, the cache sees aligned tokens) at the realistic
# shapes, and the CPU tests' small shapes (N = 1, which Triton specialises, and odd N; D 64
# and a non-power-of-two 96; 16-row matmul tiles) with fp16; sm_90 also gets one.
REALISTIC_DTYPES = {90: DTYPES, 80: ("float32",)}
SMALL_CACHE = {90: [], 80: [(1, 64, 1, "float32"), (7, 96, 13, "float16")]}  # (N, D, M, dtype)
# (N, D_in, D_hid, D_out, dtype): square ones, and rectangular ones as the interpreter tests
# run them. Not the interpreter's prime widths (29 -> 53 -> 41): they compile, but ptxas
# spills 28-68 B on sm_80 at 255 registers (strides not divisible by 16 load element by
# element), and no CLIP has such a width (512, 768, 1024: multiples of 16).
SMALL_ALIGN = {90: [(7, 96, 96, 96, "float16"), (7, 48, 80, 64, "float16")],
               80: [(1, 64, 64, 64, "float32"), (37, 48, 80, 64, "float32")]}
# PromptKD's align, 512 -> 768 -> 768, at its batch of 8 images (N = 1576 is not
# divisible by 16: its own specialisation, and 64 x 64 tiles for dx) and of 32
PROMPTKD_ALIGN = [(8 * 197, 512, 768, 768), (32 * 197, 512, 768, 768)]  # (N, D_in, D_hid, D_out)


def cache_cases(capability):
    """(N, D, M, token dtype) for kernels.triton_cache_update's launcher (cache_partials)."""
    return [(n, d, m, dt) for n in REALISTIC_N for d in REALISTIC_D for m in REALISTIC_M
            for dt in REALISTIC_DTYPES[capability]] + SMALL_CACHE[capability]


def align_cases(capability):
    """(N, D_in, D_hid, D_out, x dtype) for kernels.triton_feature_align's launcher, forward
    and backward. For the square ones one realistic N (every N >= 64 divisible by 16 gets the
    same tiles and specialisation) and one batch of 20 images (3940 tokens, not divisible by 16:
    Triton's other specialisation, as for any batch that is not a multiple of 16 images)."""
    return ([(n, d, d, d, dt) for n in (REALISTIC_N[0], 20 * 197) for d in REALISTIC_D
             for dt in REALISTIC_DTYPES[capability]]
            + [(*shape, dt) for shape in PROMPTKD_ALIGN for dt in REALISTIC_DTYPES[capability]]
            + SMALL_ALIGN[capability])


# ------------------------------------------------------------------ the compiling subprocess

class _AotDriver:
    """Stands in for triton's CUDA driver: just enough for JITFunction.run to pick a target."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0


def _compile_only(kernel, compiled, ptxas_logs):
    """Replace kernel's launch by a warmup (specialise and compile, never run); collect each
    distinct compiled kernel in `compiled`, keyed by its hash, and ptxas's report of each
    fresh compile in `ptxas_logs` (Triton prints it with knobs.nvidia.dump_ptxas_log)."""
    jit_run = type(kernel).run

    def run(*args, grid, warmup, **kwargs):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # stdout carries the JSON report
            binary = jit_run(kernel, *args, grid=grid, warmup=True, **kwargs)
        compiled[binary.hash] = binary
        if log.getvalue():
            ptxas_logs[binary.hash] = log.getvalue()
        return binary

    kernel.run = run


def _ptxas_usage(log):
    """Registers, stack frame and spill bytes from ptxas -v's report of one kernel."""
    registers = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or frame is None:
        raise ValueError(f"unexpected ptxas report:\n{log}")
    return dict(registers=int(registers.group(1)), stack=int(frame.group(1)),
                spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))


def _describe(binary, ptxas_log):
    src = binary.src
    return dict(
        kernel=src.fn.__name__,
        signature={name: ty for name, ty in src.signature.items() if ty != "constexpr"},
        constexprs={src.fn.arg_names[path[0]]: value for path, value in src.constants.items()},
        num_warps=binary.metadata.num_warps,
        num_stages=binary.metadata.num_stages,
        shared=binary.metadata.shared,
        cubin_bytes=len(binary.asm.get("cubin", b"")),
        **_ptxas_usage(ptxas_log),
    )


def compile_all(capability):
    """Run both launchers over every case for one compute capability; returns a JSON-able
    dict: the compiled kernels, the cases that failed, and every kernel of kernels/."""
    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(_AotDriver(GPUTarget("cuda", capability, 32)))
    knobs.nvidia.dump_ptxas_log = True
    from kernels import triton_cache_update as cache_module
    from kernels import triton_feature_align as align_module
    compiled, ptxas_logs = {}, {}
    all_kernels = []
    for module in (cache_module, align_module):
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction):
                _compile_only(obj, compiled, ptxas_logs)
                all_kernels.append(name)

    failures = []
    for n, d, m, dtype in cache_cases(capability):
        try:
            cache_module.cache_partials(torch.empty(n, d, dtype=getattr(torch, dtype)), torch.empty(m, d))
        except Exception as error:  # report every failing case, not just the first
            failures.append(dict(case=f"cache_partials N={n} D={d} M={m} {dtype}", error=str(error)))
    for n, d_in, d_hid, d_out, dtype in align_cases(capability):
        x = torch.empty(n, d_in, dtype=getattr(torch, dtype), requires_grad=True)  # dx path too
        params = [torch.empty(shape, requires_grad=True)
                  for shape in [(d_hid, d_in), d_hid, d_hid, d_hid, (d_out, d_hid), d_out]]
        try:
            y, _, _ = align_module.feature_align(x, *params, eps=1e-5)
            y.backward(torch.empty(n, d_out))
        except Exception as error:
            failures.append(dict(case=f"feature_align N={n} D_in={d_in} D_hid={d_hid} D_out={d_out} {dtype}",
                                 error=str(error)))
    return dict(compiled=[_describe(b, ptxas_logs[h]) for h, b in compiled.items()], failures=failures,
                all_kernels=all_kernels)


# ------------------------------------------------------------------ the tests

@pytest.fixture(scope="module")
def reports():
    """Start one compiling subprocess per target at once (they run in parallel), then collect."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as cache_dir:
        env["TRITON_CACHE_DIR"] = cache_dir  # empty: every kernel really compiles, every run
        procs = {cap: subprocess.Popen([sys.executable, os.path.abspath(__file__), str(cap)], env=env,
                                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for cap in TARGETS}
        try:
            outputs = {cap: proc.communicate(timeout=300) for cap, proc in procs.items()}
        finally:
            for proc in procs.values():  # only still running after a timeout
                proc.kill()
    results = {}
    for cap, (stdout, stderr) in outputs.items():
        assert procs[cap].returncode == 0, f"sm_{cap} compile run crashed:\n{stderr[-4000:]}"
        results[cap] = json.loads(stdout)
    return results


@pytest.mark.parametrize("capability", sorted(TARGETS))
def test_every_kernel_compiles_to_a_cubin(reports, capability):
    report = reports[capability]
    assert not report["failures"], f"sm_{capability}:\n" + "\n".join(
        f"{f['case']}: {f['error']}" for f in report["failures"])
    assert {k["kernel"] for k in report["compiled"]} == set(report["all_kernels"]), (
        "a @triton.jit kernel of kernels/ that no launcher case reached")
    for k in report["compiled"]:
        assert k["cubin_bytes"] > 0, f"sm_{capability}: no cubin for {k}"


def describe(k):
    return f"{k['kernel']} {k['constexprs']} {k['signature'].get('x_ptr') or k['signature'].get('a_ptr')}"


@pytest.mark.parametrize("capability", sorted(TARGETS))
def test_no_kernel_spills_registers(reports, capability):
    """Spills go to local memory (L1/L2 traffic per use); ptxas's report must show none, at
    every cache size and dtype compiled."""
    spilling = [f"{describe(k)}: {k['registers']} registers, {k['spill_stores']} B spill stores, "
                f"{k['spill_loads']} B spill loads" for k in reports[capability]["compiled"]
                if k["spill_stores"] or k["spill_loads"]]
    assert not spilling, f"sm_{capability}:\n" + "\n".join(spilling)


@pytest.mark.parametrize("capability", sorted(TARGETS))
def test_shared_memory_leaves_room_for_one_more_stage(reports, capability):
    """Shared memory holds num_stages - 1 pipeline buffers; one more (another Triton release's
    pipeliner) must still fit the GPU's per-block limit."""
    for k in reports[capability]["compiled"]:
        with_one_more = k["shared"] * k["num_stages"] / max(1, k["num_stages"] - 1)
        assert with_one_more <= TARGETS[capability], (
            f"sm_{capability}: {describe(k)} needs {k['shared']} B of shared memory, "
            f"{with_one_more:.0f} B with one more stage; the GPU allows {TARGETS[capability]}")


def test_every_cache_size_the_launcher_accepts_was_compiled(reports):
    import kernels

    padded = {max(16, 1 << (m - 1).bit_length()) for m in range(1, kernels.TRITON_MAX_CACHE_SIZE + 1)}
    for capability in TARGETS:
        compiled = {k["constexprs"]["M_PAD"] for k in reports[capability]["compiled"]
                    if k["kernel"] == "_cache_scores_kernel"}
        assert compiled == padded, capability


def test_every_variant_and_dtype_was_compiled(reports):
    """The launchers reached every matmul flag combination and every input dtype."""
    matmuls = [k for k in reports[90]["compiled"] if k["kernel"] == "_matmul_kernel"]
    flags = {(k["constexprs"]["A_BN"], k["constexprs"]["HAS_BIAS"], k["constexprs"]["EPILOGUE"])
             for k in matmuls}
    from_align = {  # (A_BN, HAS_BIAS, EPILOGUE) of the matmul calls in kernels/triton_feature_align.py
        (0, True, 1),  # h = x @ w1^T + b1, column statistics
        (1, True, 0),  # y = relu(BN(h)) @ w2^T + b2
        (0, False, 2),  # dpre = dy @ w2, ReLU/BN gating and its sums
        (2, False, 0),  # dw2^T = relu(BN(h))^T @ dy
        (0, False, 0),  # dx = dh @ w1, dw1 = dh^T @ x
    }
    assert flags == from_align
    x_types = {f"*{t}" for t in ("fp32", "fp16", "bf16")}
    # x is the left operand of the first matmul and the right one of dw1 = dh^T @ x
    assert {k["signature"]["a_ptr"] for k in matmuls if k["constexprs"]["EPILOGUE"] == 1} == x_types
    assert {k["signature"]["b_ptr"] for k in matmuls if k["constexprs"]["A_BN"] == 0
            and k["constexprs"]["EPILOGUE"] == 0} == x_types
    for name in ("_cache_scores_kernel", "_slot_sums_kernel"):
        assert {k["signature"]["x_ptr"] for k in reports[90]["compiled"] if k["kernel"] == name} == x_types


if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # kernels/, as the test's subprocess finds it
    json.dump(compile_all(int(sys.argv[1])), sys.stdout)
