"""Compile the fused Triton GEMMs for a GPU architecture without a GPU, and report what the
compiler made of them: which matrix instructions (Hopper's wgmma, or mma.sync), where the gated
operand comes from (registers or shared memory), shared memory, special-function calls, and
whether each split-K configuration hands its partial sums on in a safe order.

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


def _thread_zero_alone(ptx: str, line: str, threads: int) -> bool:
    """Whether `line` is guarded by tid.x == 0, or by tid.x & mask == 0 with a mask of all ones
    covering every thread of the block (Triton 3.6 writes the latter)."""
    guard = re.match(r"@(%p\d+) ", line)
    tested = guard and re.search(rf"setp\.eq\.[bsu]32\s+{guard[1]}, (%r\d+), 0;", ptx)
    tid = re.search(r"mov\.u32\s+(%r\d+), %tid\.x;", ptx)
    if not tested or not tid:
        return False
    if tested[1] == tid[1]:
        return True
    masked = re.search(rf"and\.b32\s+{tested[1]}, {tid[1]}, (\d+);", ptx)
    return bool(masked) and int(masked[1]) >= threads - 1 and (int(masked[1]) + 1) & int(masked[1]) == 0


def split_handoff(ptx: str, threads: int) -> str:
    """Whether a split-K program hands its partial sums on as the PTX memory model needs, read in
    program order: the partials stored, a bar.sync, thread 0 alone counting the tile's arrival
    with an acq_rel atomic at GPU scope, a bar.sync, the partials loaded past L1 (.cg), then the
    count reset. The interpreter runs one program at a time, so only the PTX can show this."""
    lines = [line.strip() for line in ptx.splitlines()]
    counts = [i for i, line in enumerate(lines) if "atom.global.gpu.acq_rel.add" in line]
    resets = [i for i, line in enumerate(lines) if "atom.global.gpu.relaxed.exch" in line]
    if len(counts) != 1 or len(resets) != 1 or resets[0] < counts[0]:
        return "no single count, then reset"
    count, reset = counts[0], resets[0]
    if not _thread_zero_alone(ptx, lines[count], threads):
        return "count not by thread 0 alone"
    def barrier_between(first, last):
        return any(re.match(r"bar\.sync\s+0;", lines[i]) for i in range(first, last))

    stores = [i for i in range(count) if "st.global" in lines[i]]
    if not stores or not barrier_between(stores[-1], count):
        return "no bar.sync between the partials' stores and the count"
    loads = [i for i in range(count, reset) if "ld.global" in lines[i]]
    if not loads or any(".cg" not in lines[i] for i in loads):
        return "partials not all loaded with .cg"
    if not barrier_between(count, loads[0]):
        return "no bar.sync between the count and the partials' loads"
    return "ordered"


def report(name, fn, config, flags, arch: int, dtype: str) -> str:
    constexprs = {**flags, **config.kwargs}
    source = triton.compiler.ASTSource(fn=fn, signature=signature(fn, dtype), constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": config.num_warps, "num_stages": config.num_stages, **OPTIONS})
    ptx = kernel.asm["ptx"]
    wgmma = re.findall(r"wgmma\.mma_async\S*\s+\{[^}]*\},\s*(\{|%rd)", ptx)
    a_from = "-" if not wgmma else ("registers" if all(w == "{" for w in wgmma) else "shared memory")
    tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_W", "BLOCK_X", "BLOCK_K"))
    splits = config.kwargs.get("SPLIT", 1)
    split = f" split {splits}" if splits > 1 else ""
    handoff = split_handoff(ptx, 32 * config.num_warps) if splits > 1 else "-"
    return (f"| {name} | {tile} w{config.num_warps} s{config.num_stages}{split} | {len(wgmma)} | "
            f"{len(re.findall(r'mma.sync', ptx))} | {a_from} | {kernel.metadata.shared // 1024} KiB | "
            f"{len(re.findall(r'ex2.approx', ptx))} | {handoff} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--dtype", default="bf16", choices=sorted(TYPES))
    parser.add_argument("--configs", type=int, default=None, help="only the first N configurations of each kernel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile")
    print(f"triton {triton.__version__}, sm_{args.arch}, activations {args.dtype}")
    print("| kernel | tile (W x X x K), warps, stages | wgmma | mma.sync | gated operand from | shared | ex2 "
          "| split-K handoff |")
    print("|---|---|---|---|---|---|---|---|")
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
