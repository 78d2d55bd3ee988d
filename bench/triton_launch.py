"""Host time of the triton backend's launches: each kernel launched through Triton
(`kernel[grid](...)`, the autotuner's lookup included) and through csext's Launcher
(kernels/launch.py), then the backend's two linear paths, forward+backward.

    python bench/triton_launch.py                  # no GPU: Triton's Python only (see below)
    python bench/triton_launch.py --device cuda    # real launches of tiny kernels

On CUDA the kernels run on tiny tensors, and each sample times the host issuing its calls to an
idle GPU, not the kernels. Without a GPU the script
installs a stand-in driver, and a compiled kernel whose launch does nothing but call the
launch hooks it is given (`install_stand_ins`): what is timed is then Python only, Triton's
and csext's, up to the binary's C launcher, which is not timed; the layer rows time csext's
code around no-op kernels.
Figures are medians of `--repeats` samples of `--calls` calls each, in a rotating order.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import machine_info  # noqa: E402


# --- stand-ins for a GPU ----------------------------------------------------------------------------


class StandInDriver:
    """What Triton's launch path asks of its driver, for a CUDA device that is not there."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def install_stand_ins(record=None):
    """Make every kernel of csext.kernels launchable without a GPU: Triton's driver answers as an
    sm_90 device, compiling yields a binary per specialization whose launch does nothing but
    call the launch hooks it is given, as Triton's launcher does, and hand its arguments to
    `record(binary, args)`, and autotuning picks each kernel's last configuration;
    csext.functional takes backend="triton" for CPU tensors. Returns the binaries
    made, by (kernel name, Triton's cache key)."""
    from triton.compiler import CompiledKernel
    from triton.runtime.driver import driver

    from csext.kernels import gate, gated_matmul

    class NoOpBinary(CompiledKernel):
        def __init__(self, name):
            self.name, self.function, self.packed_metadata, self.src = name, 0, None, None
            self.module, self._run = 0, self._launch  # loaded, as far as CompiledKernel knows

        def _launch(self, *args):
            metadata, enter_hook, exit_hook = args[6:9]
            # As Triton's C launcher: a hook that is not None is called, around the launch.
            if enter_hook is not None:
                enter_hook(metadata)
            if record is not None:
                record(self, args)
            if exit_hook is not None:
                exit_hook(metadata)

        def __del__(self):
            pass

    driver.set_active(StandInDriver())
    # csext.backends routes backend="triton" for CPU tensors, as under the interpreter
    from csext import backends
    from csext.backends import triton

    backends._TRITON_INTERPRETED = True
    backends._AVAILABLE = tuple(dict.fromkeys((*backends._AVAILABLE, "triton")))
    backends._MODULES["triton"] = triton
    backends._RESOLVED.clear()
    binaries = {}
    for kernel in (gate.gate_forward_kernel, gate.gate_backward_kernel, gated_matmul.gated_matmul_kernel,
                   gated_matmul.gated_weight_grad_kernel):

        def compile_stand_in(key, signature, device, constexprs, options, attrs, warmup, kernel=kernel):
            binary = binaries[kernel.__name__, key] = NoOpBinary(kernel.__name__)
            binary.options = options  # what Triton would have compiled it with
            kernel.device_caches[device][0][key] = binary
            return binary

        kernel._do_compile = compile_stand_in
    for tuned in (gated_matmul.gated_matmul_tuned, gated_matmul.gated_weight_grad_tuned):
        tuned._bench = lambda *args, config, tuned=tuned, **meta: [-float(tuned.configs.index(config))]
    return binaries


# --- the calls timed ------------------------------------------------------------------------------


def launches(device):
    """name -> (through Triton, through the Launcher): one launch of each kernel on small tensors."""
    import triton

    from csext.kernels import gate, gated_matmul as mm
    from csext.kernels.launch import OPTIONS  # the Launcher's compile options, for the same binaries

    m, n, k = 4, 8, 8
    w, s = torch.randn(n, k, device=device), torch.randn(n, k, device=device)
    g, x, out = torch.randn(m, n, device=device), torch.randn(m, k, device=device), torch.empty(m, n, device=device)
    gw, gs, w_eff, gb = torch.empty_like(w), torch.empty_like(s), torch.empty_like(w), torch.empty(n, device=device)
    beta = torch.tensor(4.0, device=device)
    numel, grid = w.numel(), (triton.cdiv(w.numel(), gate.BLOCK),)
    mm_args = (x, w, s, out, out, beta, out, out, m, n, k, *x.stride(), *w.stride(), *s.stride(), *out.stride())
    wg_args = (g, x, w, s, gw, gs, gb, beta, m, n, k, *g.stride(), *x.stride(), *w.stride(), *s.stride(), 1e-4)
    mm_flags = dict(HARD=False, HAS_BIAS=False, PRECISION="ieee", DOT_DTYPE=triton.language.float32)
    wg_flags = dict(HARD=False, NEED_WEIGHT=True, NEED_MASK=True, NEED_BIAS=True, PRECISION="ieee")
    if mm.AUTOTUNE:
        mm_kernel, wg_kernel = mm.gated_matmul_tuned, mm.gated_weight_grad_tuned
    else:
        mm_kernel, wg_kernel = mm.gated_matmul_kernel, mm.gated_weight_grad_kernel
        mm_flags, wg_flags = {**mm_flags, **mm.FIXED_GATED_CONFIG}, {**wg_flags, **mm.FIXED_CONFIG}
    mm_grid = mm._split_grid(m, n)
    wg_grid = lambda meta: (triton.cdiv(n, meta["BLOCK_W"]) * triton.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
    return {
        "gate forward": (
            lambda: gate.gate_forward_kernel[grid](w, s, w_eff, beta, numel, 1, HARD=False, ROWS=False,
                                                   BLOCK=gate.BLOCK, num_warps=4, **OPTIONS),
            lambda: gate.gate_forward(w, s, beta, w_eff, False)),
        "gate backward": (
            lambda: gate.gate_backward_kernel[grid](w, w, s, gw, gs, beta, numel, 1e-4, BLOCK=gate.BLOCK, num_warps=4,
                                                    **OPTIONS),
            lambda: gate.gate_backward(w, w, s, beta, 1e-4, gw, gs)),
        "fused matmul": (
            lambda: mm_kernel[mm_grid](*mm_args, **mm_flags, **OPTIONS),
            lambda: mm.gated_matmul(x, w, s, beta, None, out, False, "ieee", torch.float32)),
        "weight gradient": (
            lambda: wg_kernel[wg_grid](*wg_args, **wg_flags, **OPTIONS),
            lambda: mm.gated_weight_grad(g, x, w, s, beta, 1e-4, gw, gs, gb, False, "ieee")),
    }


# The layer rows' settings: (name, launches through the Launcher)
SETTINGS = [("Triton", False), ("Launcher", True)]


def layer_calls(device):
    """name|setting -> forward+backward of csext.functional.gated_linear on the triton backend,
    its two paths, and of gated_conv2d, in each of SETTINGS; and of F.linear (the floor). Then
    the fused linear as the GPU benchmark calls it (a bias, the forward under bf16 autocast, x
    float32) through the Launcher, and on CUDA F.linear so too (on the CPU autocast's F.linear
    computes in bf16, which is not host time)."""
    import torch.nn.functional as F

    from csext import functional as CF
    from csext.backends import triton
    from csext.kernels import gate, gated_matmul

    launchers = (gate._launch_forward, gate._launch_backward, gated_matmul._launch_matmul,
                 gated_matmul._launch_weight_grad)
    fused_max_rows = triton.FUSED_MAX_ROWS
    x = torch.randn(4, 8, device=device, requires_grad=True)
    w = torch.randn(8, 8, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    s = torch.randn(8, 8, device=device, requires_grad=True)
    xc = torch.randn(1, 4, 6, 6, device=device, requires_grad=True)
    wc = torch.randn(4, 4, 3, 3, device=device, requires_grad=True)
    sc = torch.randn(4, 4, 3, 3, device=device, requires_grad=True)

    def run(path):
        if path == "gate + F.conv2d":
            return CF.gated_conv2d(xc, wc, sc, 4.0, None, 1, 1, penalty=1e-4, backend="triton")
        if path.startswith("fused, autocast, bias"):
            with torch.autocast(device, dtype=torch.bfloat16):
                return CF.gated_linear(x, w, s, 4.0, b, penalty=1e-4, backend="triton")
        return CF.gated_linear(x, w, s, 4.0, penalty=1e-4, backend="triton")

    def dense_autocast_bias():
        with torch.autocast(device, dtype=torch.bfloat16):
            y = F.linear(x, w, b)
        y.sum().backward()

    def layer(path, use_launcher):
        def call():
            for launcher in launchers:
                launcher.compiled = use_launcher  # False: every launch through kernel[grid](...)
            triton.FUSED_MAX_ROWS = fused_max_rows if path.startswith("fused") else 0
            try:
                run(path).sum().backward()
            finally:
                for launcher in launchers:
                    launcher.compiled = True
                triton.FUSED_MAX_ROWS = fused_max_rows
        return call

    calls = {f"{path}|{setting}": layer(path, *flags)
             for path in ("fused linear", "gate + F.linear", "gate + F.conv2d") for setting, *flags in SETTINGS}
    calls["F.linear (dense)|"] = lambda: F.linear(x, w).sum().backward()
    calls["fused, autocast, bias|Launcher"] = layer("fused, autocast, bias", True)
    if device == "cuda":
        calls["F.linear, autocast, bias|"] = dense_autocast_bias
    return calls


def timed(calls: dict, repeats: int, per_sample: int, device) -> dict:
    """name -> median microseconds per call, the names timed in a rotating order. On CUDA each
    sample starts on an idle GPU and stops when the host has issued its calls, without waiting
    for the kernels: host time, unless the launch queue fills (about a thousand launches)."""
    names = list(calls)
    for name in names:
        for _ in range(3):
            calls[name]()  # compile, autotune, fill the caches
    samples = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            call = calls[name]
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(per_sample):
                call()
            samples[name].append((time.perf_counter() - start) / per_sample * 1e6)
    if device == "cuda":
        torch.cuda.synchronize()
    return {name: statistics.median(ts) for name, ts in samples.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=500, help="calls per sample")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if args.repeats < 1 or args.calls < 1:
        parser.error("--repeats and --calls must be >= 1")
    if args.device == "cpu":
        install_stand_ins()
    info = machine_info(torch.device(args.device))
    print(f"{info['machine']} | torch {info['torch']} | triton {info['triton']} | commit {info['commit']}"
          + (" | no GPU: no-op kernels, Python only" if args.device == "cpu" else ""))
    print("host time of one launch (median us): through Triton, through csext's Launcher")
    pairs = launches(args.device)
    flat = {f"{name}|{route}": call for name, both in pairs.items() for route, call in zip(("triton", "launcher"), both)}
    times = timed(flat, args.repeats, args.calls, args.device)
    for name in pairs:
        through, cached = times[f"{name}|triton"], times[f"{name}|launcher"]
        print(f"  {name:18s} {through:7.2f} us  {cached:7.2f} us  ({through / cached:.1f}x)")
    print("host time of a forward+backward (median us) on the triton backend: csext.functional.gated_linear's\n"
          "two paths, x (4, 8) and w (8, 8), and gated_conv2d, x (1, 4, 6, 6) and w (4, 4, 3, 3):\n"
          f"{'; '.join(name for name, *_ in SETTINGS)}; and F.linear's. Then with a bias and the forward\n"
          "under bf16 autocast (x float32), through the Launcher (and, on CUDA, F.linear so too)")
    times = timed(layer_calls(args.device), args.repeats, max(1, args.calls // 5), args.device)
    for name in dict.fromkeys(key.split("|")[0] for key in times):
        row = [times[key] for key in times if key.split("|")[0] == name]
        print(f"  {name:32s}" + "".join(f" {us:7.1f} us" for us in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
