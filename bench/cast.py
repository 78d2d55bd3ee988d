"""GPU time of widening a gradient to float32: ATen's cast (`x.float()`) against csext::cast,
whose CUDA kernel the gated layers' input-cast node calls in the backward (csrc/input_cast.cpp).

    python bench/cast.py --device cuda

Under autocast a float32 layer input is cast to bfloat16, and dL/dx is cast back to float32.
On CUDA ATen widens half and bfloat16 element by element (its vectorized copies only narrow to
them); csext's kernel moves 16 bytes a thread per access. The shapes are the inputs of the
benchmark's layers: the linear layer's x at M = 8192 and M = 2048 (K = 4096), and two of the
convolutions' (batch 128, channels_last). Each figure is the median of --repeats samples of
--calls casts, timed with CUDA events, in a rotating order; GB/s counts the bytes read and
written.

A second table times whole layers of the `cuda` backend on those inputs (float32 x under
autocast): one forward+backward replayed from a CUDA graph (GPU time, as bench/run.py's mode
`graph`), with x cast by csext's node as the layers do, and with x cast by `x.to` before the
layer (ATen's node), in the same run. On the CPU csext::cast is ATen's cast, and the script
only checks that the casts run. Rows (provider `aten` or `csext`, with the ratio of ATen's
time to this one) are appended atomically to bench/results/cast.csv, or --csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

import csext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Clock, append_rows, capture, machine_info  # noqa: E402

FIELDS = ["run", "commit", "device", "machine", "torch", "triton", "dtype", "table", "input", "provider",
          "median_us", "aten_over_this", "repeats", "calls"]

SHAPES = {  # name -> (shape, channels_last)
    "linear x, M=8192 K=4096": ((8192, 4096), False),
    "linear x, M=2048 K=4096": ((2048, 4096), False),
    "conv x, N=128 C=256 8x8": ((128, 256, 8, 8), True),
    "conv x, N=128 C=16 32x32": ((128, 16, 32, 32), True),
}


class CastFirst(nn.Module):
    """`layer` given x already cast with x.to, so that the layer itself casts nothing."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.layer, self.dtype = layer, dtype

    def forward(self, x):
        return self.layer(x.to(self.dtype))


def median_times(calls: dict, clock: Clock, repeats: int, inner: int) -> dict:
    """name -> median us per call of `repeats` samples of `inner` calls, in a rotating order."""
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(clock.time(lambda f=calls[name]: [f() for _ in range(inner)]) * 1e3 / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def layer_for(shape, device: torch.device, backend: str) -> nn.Module:
    """The gated layer that takes x of this shape, as bench/run.py builds them (a linear layer with
    4096 outputs, a 3x3 convolution without bias in channels_last)."""
    if len(shape) == 2:
        layer = csext.GatedLinear(shape[1], 4096, device=device)
    else:
        layer = csext.GatedConv2d(shape[1], shape[1], 3, padding=1, bias=False, device=device)
        layer = layer.to(memory_format=torch.channels_last)
    with torch.no_grad():
        layer.mask_logits.normal_()
    layer.beta, layer.penalty, layer.backend = 4.0, 1e-4, backend
    return layer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--csv", type=Path, default=Path(__file__).resolve().parent / "results" / "cast.csv")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if not csext._ops.extension_loaded():
        parser.error("csext::cast is an op of csext._C, which is not built here")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    clock = Clock(device)
    info = {**machine_info(device), "dtype": args.dtype, "repeats": args.repeats, "calls": args.calls}
    rows = []

    def record(table: str, name: str, shape, times: dict) -> None:
        for provider, median in times.items():
            rows.append({**info, "table": table, "input": f"{name} {tuple(shape)}", "provider": provider,
                         "median_us": f"{median:.2f}", "aten_over_this": f"{times['aten'] / median:.3f}"})

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
        t = median_times({"aten": lambda: x.float(), "csext": lambda: torch.ops.csext.cast(x, torch.float32)},
                         clock, args.repeats, args.calls)
        record("cast", name, shape, t)
        moved = x.numel() * (x.element_size() + 4) / 1e3  # kB read and written: per us, GB/s
        print(f"| {name} {tuple(shape)} | {t['aten']:.1f} us ({moved / t['aten']:.0f} GB/s) | {t['csext']:.1f} us "
              f"({moved / t['csext']:.0f} GB/s) | {t['aten'] / t['csext']:.2f}x |")
    if device.type != "cuda" or "cuda" not in csext.backends.available():
        print("layers: no CUDA device, or no cuda backend in this install; skipped")
        return save(rows, args)
    print(f"\nGatedLinear / GatedConv2d on the cuda backend, float32 x under {args.dtype} autocast: one "
          f"forward+backward replayed from a CUDA graph, median us of {args.repeats} samples of {args.calls}")
    print("| layer input | x cast by csext's node | x cast by x.to | x.to / node |")
    print("|---|---|---|---|")
    for name, (shape, channels_last) in SHAPES.items():
        torch.manual_seed(0)
        layer = layer_for(shape, device, "cuda")
        x = torch.randn(shape, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            grad_out = torch.randn_like(layer(x))
        graphs = {"csext": capture(layer, x, grad_out, dtype),  # the layer casts x with csext's node
                  "aten": capture(CastFirst(layer, dtype), x, grad_out, dtype)}
        t = median_times({key: graph.replay for key, graph in graphs.items()}, clock, args.repeats, args.calls)
        record("layer", name, shape, t)
        print(f"| {name} {tuple(shape)} | {t['csext']:.1f} us | {t['aten']:.1f} us | {t['aten'] / t['csext']:.3f}x |")
        del graphs
        torch.cuda.empty_cache()
    return save(rows, args)


def save(rows: list[dict], args) -> int:
    if not args.no_save:
        append_rows(args.csv, rows, FIELDS)
        print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
