"""Compile the fused Triton GEMMs for a GPU architecture without a GPU, and report what the
compiler made of them: which matrix instructions (Hopper's wgmma, or mma.sync), where the gated
operand comes from (registers or shared memory), shared memory, special-function calls.

    python bench/inspect_triton.py [--arch 90] [--dtype bf16]

Run it without TRITON_INTERPRET=1 (the interpreter has no compiler). It reads the PTX, which is
enough for these questions; `cuobjdump -sass` of a built kernel gives the machine code.
"""

import argparse
import inspect
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kernels/ from the source tree

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from kernels import gated_matmul  # noqa: E402
from kernels.launch import OPTIONS  # noqa: E402

TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
DOT_DTYPES = {"bf16": triton.language.bfloat16, "fp16": triton.language.float16, "fp32": triton.language.float32}
FLOAT32_POINTERS = {"w_ptr", "s_ptr", "beta_ptr", "bias_ptr", "grad_w_ptr", "grad_s_ptr", "grad_b_ptr", "partial_ptr"}


def signature(fn, dtype: str) -> dict:
    """Argument types: float32 weights, logits and gradients; activations in `dtype`."""
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name == "count_ptr":
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FLOAT32_POINTERS else TYPES[dtype]
        elif name in ("M", "N", "K") or name.startswith("stride"):
            sig[name] = "i32"
        elif name == "penalty":
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    return sig


def report(name, fn, config, flags, arch: int, dtype: str) -> str:
    constexprs = {**flags, **config.kwargs}
    source = triton.compiler.ASTSource(fn=fn, signature=signature(fn, dtype), constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": config.num_warps, "num_stages": config.num_stages, **OPTIONS})
    ptx = kernel.asm["ptx"]
    wgmma = re.findall(r"wgmma\.mma_async\S*\s+\{[^}]*\},\s*(\{|%rd)", ptx)
    a_from = "-" if not wgmma else ("registers" if all(w == "{" for w in wgmma) else "shared memory")
    tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_W", "BLOCK_X", "BLOCK_K"))
    split = f" split {config.kwargs['SPLIT']}" if config.kwargs.get("SPLIT", 1) > 1 else ""
    return (f"| {name} | {tile} w{config.num_warps} s{config.num_stages}{split} | {len(wgmma)} | "
            f"{len(re.findall(r'mma.sync', ptx))} | {a_from} | {kernel.metadata.shared // 1024} KiB | "
            f"{len(re.findall(r'ex2.approx', ptx))} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--dtype", default="bf16", choices=sorted(TYPES))
    parser.add_argument("--configs", type=int, default=None, help="only the first N configurations of each kernel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile")
    print(f"triton {triton.__version__}, sm_{args.arch}, activations {args.dtype}")
    print("| kernel | tile (W x X x K), warps, stages | wgmma | mma.sync | gated operand from | shared | ex2 |")
    print("|---|---|---|---|---|---|---|")
    for config in gated_matmul.GATED_CONFIGS[: args.configs]:
        print(report("forward / input grad", gated_matmul.gated_matmul_kernel, config,
                     {"HARD": False, "HAS_BIAS": True, "PRECISION": "ieee", "DOT_DTYPE": DOT_DTYPES[args.dtype]},
                     args.arch, args.dtype))
    for config in gated_matmul.WEIGHT_GRAD_CONFIGS[: args.configs]:
        print(report("weight grad", gated_matmul.gated_weight_grad_kernel, config,
                     {"HARD": False, "NEED_WEIGHT": True, "NEED_MASK": True, "NEED_BIAS": True, "PRECISION": "ieee"},
                     args.arch, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
