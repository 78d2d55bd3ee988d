"""GPU time of widening a gradient to float32: ATen's cast (`x.float()`) against csext::cast,
whose CUDA kernel the gated layers' input-cast node calls in the backward (csrc/input_cast.cpp).

    python bench/cast.py --device cuda

Under autocast a float32 layer input is cast to bfloat16, and dL/dx is cast back to float32.
On CUDA ATen widens half and bfloat16 element by element (its vectorized copies only narrow to
them); csext's kernel moves 16 bytes a thread per access. The shapes are the inputs of the
benchmark's layers: the linear layer's x at M = 8192 and M = 2048 (K = 4096), and two of the
convolutions' (batch 128, channels_last). Each figure is the median of --repeats samples of
--calls casts, timed with CUDA events, in a rotating order; GB/s counts the bytes read and
written. On the CPU csext::cast is ATen's cast, and the script only checks that it runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import csext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Clock, machine_info  # noqa: E402

SHAPES = {  # name -> (shape, channels_last)
    "linear x, M=8192 K=4096": ((8192, 4096), False),
    "linear x, M=2048 K=4096": ((2048, 4096), False),
    "conv x, N=128 C=256 8x8": ((128, 256, 8, 8), True),
    "conv x, N=128 C=16 32x32": ((128, 16, 32, 32), True),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if not csext._ops.extension_loaded():
        parser.error("csext::cast is an op of csext._C, which is not built here")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    clock = Clock(device)
    info = machine_info(device)
    print(f"widening {args.dtype} to float32 on {info['machine']} (torch {info['torch']}, commit {info['commit']}); "
          f"median us per cast of {args.repeats} samples of {args.calls}")
    print("| input | ATen x.float() | csext::cast | ATen / csext |")
    print("|---|---|---|---|")
    for name, (shape, channels_last) in SHAPES.items():
        if device.type != "cuda":
            shape = tuple(max(1, d // 64) for d in shape)
        x = torch.randn(shape, device=device).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(torch.ops.csext.cast(x, torch.float32), x.float())
        calls = {"aten": lambda: x.float(), "csext": lambda: torch.ops.csext.cast(x, torch.float32)}
        times = {key: [] for key in calls}
        keys = list(calls)
        for r in range(args.repeats):
            for key in keys[r % 2:] + keys[: r % 2]:
                times[key].append(clock.time(lambda f=calls[key]: [f() for _ in range(args.calls)]) * 1e3 / args.calls)
        aten, ours = statistics.median(times["aten"]), statistics.median(times["csext"])
        moved = x.numel() * (x.element_size() + 4) / 1e3  # kB read and written: per us, GB/s
        print(f"| {name} {tuple(shape)} | {aten:.1f} us ({moved / aten:.0f} GB/s) | {ours:.1f} us "
              f"({moved / ours:.0f} GB/s) | {aten / ours:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
