"""Time the fused gated GEMM (kernels/gated_matmul.py) under each of its autotuned
configurations, split-K included, against the elementwise gate followed by a library GEMM, on
the weight of a linear layer at few rows, where the fused path is taken:

    python bench/fused_gemm.py --device cuda [--rows 128,256,512,1024] [--features 4096]

For each row count M it times the forward y = x @ (w * m)^T and the input gradient
dx = G @ (w * m), x and G in bf16 with float32 w and s (as under bf16 autocast), and prints one
table row per configuration tried for that shape (`split_allowed`): its median time (the L2
cache flushed before each call, triton.testing.do_bench), its ratio over `gate + mm`, the gate
kernel writing bf16 w_eff and torch.mm reading it (`mm` alone is the plain layer's GEMM), and
its largest difference from `gate + mm`'s output, over that output's largest magnitude (both
round to bf16: a few 2^-8 at most where the configuration is right).
On the CPU it runs a small shape in Triton's interpreter (TRITON_INTERPRET=1) and float32: a
check that the script works, with no meaning as timings.
"""

import argparse
import os
import statistics
import sys
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--rows", default=None, help="row counts M, comma-separated (cuda: 128,256,512,1024)")
    parser.add_argument("--features", type=int, default=None, help="K = N (cuda: 4096)")
    parser.add_argument("--repeats", type=int, default=100, help="calls per timing (do_bench's rep, in ms, on cuda)")
    return parser.parse_args(argv)


def _timer(device: str, repeats: int):
    """fn -> median seconds of a call: triton's do_bench on CUDA (L2 flushed before each call, as
    the weights of a layer at few rows come from memory), run.py's clock on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, rep=repeats, return_mode="median") / 1e3
    import torch
    from run import Clock

    clock = Clock(torch.device("cpu"))
    return lambda fn: statistics.median(clock.time(fn) for _ in range(max(repeats, 1))) / 1e3


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # run.py; csext is the installed package
    import torch
    from run import machine_info

    from csext.kernels import gate, gated_matmul as mm

    cuda = args.device == "cuda"
    rows = [int(r) for r in (args.rows or ("128,256,512,1024" if cuda else "8,24")).split(",")]
    features = args.features or (4096 if cuda else 256)
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter has no bf16
    timed = _timer(args.device, args.repeats)
    torch.manual_seed(0)
    w = torch.randn(features, features, device=args.device)
    s = torch.randn(features, features, device=args.device)
    beta = torch.tensor(4.0, device=args.device)
    w_eff = torch.empty_like(w, dtype=dtype)
    info = machine_info(torch.device(args.device))
    print(" | ".join(str(info[k]) for k in ("machine", "torch", "triton", "commit", "run"))
          + (" | Triton interpreter" if not cuda else "") + f" | K = N = {features} | x, G, w_eff {str(dtype)[6:]}")
    print("| M | GEMM | configuration (W x X x K, warps, stages, split) | us | / gate + mm | max difference |")
    print("|---|---|---|---|---|---|")
    for m in rows:
        x = torch.randn(m, features, device=args.device, dtype=dtype)
        out = torch.empty(m, features, device=args.device, dtype=dtype)
        for gemm, transposed in (("forward", False), ("input grad", True)):

            def gate_then_mm():
                gate.gate_forward(w, s, beta, w_eff, False)
                return x @ (w_eff if transposed else w_eff.T)

            base, expected = timed(gate_then_mm), gate_then_mm().float()
            scale = expected.abs().max().item()
            timings = [("gate + mm", base, 0.0), ("mm", timed(lambda: x @ (w_eff if transposed else w_eff.T)), 0.0)]
            for config in mm.GATED_CONFIGS:
                kw = config.kwargs
                if not mm.split_allowed(m, features, features, kw["BLOCK_K"], kw["SPLIT"]):
                    continue
                given = {**kw, "num_warps": config.num_warps, "num_stages": config.num_stages}
                name = (f"{kw['BLOCK_W']}x{kw['BLOCK_X']}x{kw['BLOCK_K']} w{config.num_warps} "
                        f"s{config.num_stages} split {kw['SPLIT']}")
                out.fill_(float("nan"))  # an element a configuration leaves unwritten shows
                try:
                    seconds = timed(lambda: mm.gated_matmul(x, w, s, beta, None, out, False, "ieee", dtype,
                                                            transposed=transposed, config=given))
                except Exception as error:  # a configuration over the chip's shared memory
                    print(f"| {m} | {gemm} | {name} | failed: {type(error).__name__} | | |")
                    continue
                timings.append((name, seconds, (out.float() - expected).abs().max().item() / scale))
            for name, seconds, difference in timings:
                print(f"| {m} | {gemm} | {name} | {seconds * 1e6:.1f} | {seconds / base:.2f}x | {difference:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
