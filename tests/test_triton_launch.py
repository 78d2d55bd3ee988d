"""csext's Launcher (kernels/launch.py) against Triton's own launch path.

The Launcher skips Triton's per-call binding and specialization once it has seen a call, so the
question is whether every later call still reaches the binary Triton would pick, with the
arguments Triton would pass. No kernel compiles without a GPU: a child process (without the
TRITON_INTERPRET=1 that conftest.py sets here) installs bench/triton_launch.py's stand-ins, a
driver and binaries that record their launches, runs Triton's launch path in full up to them,
and compares, for every kernel of the triton backend and calls that differ in each thing Triton
specializes on; a repeated call must not touch Triton's launch path. Every binary is compiled
with csext's options (FMA contraction asked for), so Triton warns of no default left to it. On a GPU,
tests/test_triton.py runs the kernels through the Launcher for real.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton")


def test_launcher_launches_what_triton_launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stdout + child.stderr
    assert "all launches matched" in child.stdout


def test_bench_script_runs_without_a_gpu():
    """bench/triton_launch.py with its stand-ins runs and prints every row (timings are the
    script's business, not a test's)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "triton_launch.py"), "--repeats", "3", "--calls", "20"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    for row in ("gate forward", "fused matmul", "weight gradient", "fused linear", "gate + F.conv2d", "F.linear",
                "fused, autocast, bias"):
        assert row in run.stdout, row


# --- the child ------------------------------------------------------------------------------------


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return type(a) is type(b) and a == b


def _same_hook(ours, triton_s) -> bool:
    """The Launcher passes the hook Triton passes, or None where Triton's is an empty HookChain
    (a launcher calls nothing for either)."""
    return ours is triton_s or (ours is None and not getattr(triton_s, "calls", True))


def _went_through_triton(*args, **kwargs):
    raise AssertionError("a call the Launcher has seen went through Triton's launch path")


def _check_all():
    sys.path.insert(0, str(ROOT / "bench"))
    import triton
    from triton import knobs

    import triton_launch

    launched = []
    triton_launch.install_stand_ins(record=lambda binary, args: launched.append((binary, args)))
    from csext.kernels import gate, gated_matmul as mm, launch

    def via_launcher(launcher, grid, tensors, ints, floats, constexprs):
        launched.clear()
        launcher(grid, tensors, ints, floats, constexprs)
        (found,) = launched
        return found

    def via_launcher_alone(launcher, *call):
        """The Launcher, with Triton's launch path out of order: a call it has seen skips it."""
        route = launcher.tuned or launcher.kernel
        route.run = _went_through_triton
        try:
            return via_launcher(launcher, *call)
        finally:
            del route.run

    def via_triton(launcher, grid, tensors, ints, floats, constexprs):
        launched.clear()
        (launcher.tuned or launcher.kernel)[grid](*tensors, *ints, *floats, **constexprs, **launch.OPTIONS)
        (found,) = launched
        return found

    def check(launcher, grid, tensors, ints, floats=(), **constexprs):
        call = (launcher, grid, tensors, ints, floats, constexprs)
        first, again, reference = via_launcher(*call), via_launcher_alone(*call), via_triton(*call)
        for binary, args in (first, again):
            assert binary is reference[0], f"{launcher.kernel.__name__}: another binary than Triton's for {ints}"
            assert len(args) == len(reference[1])
            # (grid, stream, function, metadata, launch_metadata, hooks, then every parameter)
            for i, (a, b) in enumerate(zip(args, reference[1])):
                same = i == 6 or (_same_hook(a, b) if i in (7, 8) else _same(a, b))
                assert same, f"{launcher.kernel.__name__}: argument {i}: {a!r} != {b!r}"
        return first[0]

    def buffers(dtype, offset, shapes):
        """Tensors of these shapes in dtype, their data `offset` elements into their storage."""
        return tuple(torch.randn(offset + torch.Size(s).numel()).to(dtype)[offset:].view(s) for s in shapes)

    beta = torch.tensor(4.0)
    flat = lambda n: lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    seen = set()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for offset in (0, 1, 8):  # 16-byte aligned or not, by dtype
            for n in (1, 16, 1000, 2**31 + 16):  # Triton specializes 1, multiples of 16, 64-bit
                w, s, out, g, gw, gs = buffers(dtype, offset, [(7, 11)] * 6)
                for hard in (False, True):
                    seen.add(check(gate._launch_forward, flat(n), (w, s, out, beta), (n, 1), HARD=hard,
                                   ROWS=False, BLOCK=gate.BLOCK, num_warps=4))
                for penalty in (0.0, 1e-4):  # floats are never specialized: one binary
                    seen.add(check(gate._launch_backward, flat(n), (g, w, s, gw, gs, beta), (n,), (penalty,),
                                   BLOCK=gate.BLOCK, num_warps=4))
    for dtype in (torch.float32, torch.float16):
        for offset in (0, 3):
            x, w, s, o = buffers(dtype, offset, [(5, 9)] * 4)
            # One thing changed at a time, each to a value Triton specializes on.
            for m, n, k, stride in ((5, 9, 9, 9), (1, 9, 9, 9), (16, 9, 9, 9), (5, 16, 9, 9), (5, 9, 32, 9),
                                   (5, 9, 2**33, 9), (5, 9, 9, 16), (5, 9, 9, 1)):
                strides = (stride, 1) * 4
                # the GEMM in x's dtype, and in float16 (x's tiles cast, as under autocast)
                for hard, dot_dtype in ((False, dtype), (True, dtype), (False, torch.float16)):
                    seen.add(check(mm._launch_matmul, mm._split_grid(m, n), (x, w, s, o, o, beta, o, o),
                                   (m, n, k, *strides), HARD=hard, HAS_BIAS=True, PRECISION="ieee",
                                   DOT_DTYPE=mm._TRITON_DTYPES[dot_dtype], **mm._MATMUL_CONFIG))
                for hard in (False, True):
                    seen.add(check(mm._launch_weight_grad, mm._tile_grid(n, k, "BLOCK_W", "BLOCK_K"),
                                   (o, x, w, s, w, s, o, beta), (m, n, k, *strides), (1e-4,), HARD=hard,
                                   NEED_WEIGHT=True, NEED_MASK=not hard, NEED_BIAS=not hard, PRECISION="tf32",
                                   **mm._CONFIG))
    assert len(seen) > 40, f"the calls reached only {len(seen)} binaries"
    # FMA contraction asked for, not left to Triton's default (which Triton 3.9 warns will change)
    assert all(binary.options.enable_fp_fusion for binary in seen)

    # A profiler's launch hooks still see the launches that skip Triton: a hook set in place of
    # Triton's, or added to its HookChain (as Proton adds its own); and with none set, nothing
    # is built for them or called.
    w, s, out = buffers(torch.float32, 0, [(3, 3)] * 3)

    def launch_twice():
        launched.clear()
        for _ in range(2):
            gate._launch_forward(flat(9), (w, s, out, beta), (9, 1), (),
                                 dict(HARD=False, ROWS=False, BLOCK=gate.BLOCK, num_warps=4))
        return [args[6:9] for _, args in launched]

    launch_twice()  # the first launch goes through Triton; the ones below skip it

    unset = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if hasattr(unset[0], "calls"):
        assert not unset[0].calls and not unset[1].calls
        assert launch_twice() == [(None, None, None)] * 2, "empty hook chains were passed on"
    seen_by_hooks = []

    def hook(metadata):
        seen_by_hooks.append(metadata.get()["name"])

    for setting in ("replaced", "added"):
        seen_by_hooks.clear()
        try:
            if setting == "replaced":
                knobs.runtime.launch_enter_hook = knobs.runtime.launch_exit_hook = hook
            elif hasattr(unset[1], "add"):
                unset[1].add(hook)  # the exit chain alone: the metadata is still built for it
            else:
                continue
            launch_twice()
        finally:
            knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook = unset
            if hasattr(unset[1], "remove"):
                unset[1].remove(hook)
        expected = 4 if setting == "replaced" else 2
        assert seen_by_hooks == ["gate_forward_kernel"] * expected, (setting, seen_by_hooks)
    print(f"all launches matched ({len(seen)} binaries)")


if __name__ == "__main__":
    import warnings

    os.environ.pop("TRITON_DEFAULT_FP_FUSION", None)  # Triton 3.9 warns where a launch leaves it to this
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*FP_FUSION")
        _check_all()
