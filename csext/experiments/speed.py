"""What a ticket costs at inference against the dense network: FLOPs and measured latency.

    flops(model, x)                    multiply-adds of the Linear and convolution layers on x
    time_pair(dense, ticket, x, n)     median milliseconds of each, timed alternately in one run
    measure(dense, ticket, shape, n)   both at batch 1 and 256: the entry `compare` writes per ticket

The ratios (dense over ticket) are what to read: both networks are timed in the same run, call
after call in turn, so that a load on the machine falls on both.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

BATCHES = (1, 256)
_COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def flops(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of the Linear and convolution layers in one forward of x (zero weights count:
    this is the work a dense kernel does)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        per_output = module.in_features if isinstance(module, nn.Linear) else module.weight[0].numel()
        total += output.numel() * per_output

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, _COUNTED)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return total


def time_pair(dense: nn.Module, ticket: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median milliseconds of each network on x, timed alternately in one run after a warm-up."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = ([], [])
    with torch.inference_mode():
        for _ in range(3):
            dense(x)
            ticket(x)
        for _ in range(repeats):
            for net, kept in ((dense, times[0]), (ticket, times[1])):
                start = time.perf_counter()
                net(x)
                kept.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[0]), statistics.median(times[1])


def measure(dense: nn.Module, ticket: nn.Module, input_shape, repeats: int = 20) -> dict:
    """FLOPs and CPU latency of `ticket` against `dense` (both in eval mode, on the CPU) at batch 1
    (10x the repeats: one sample is quick and noisier) and 256; keyed by batch size as a string."""
    dense, ticket = dense.eval().cpu(), ticket.eval().cpu()
    generator = torch.Generator().manual_seed(0)
    one = torch.randn(1, *input_shape, generator=generator)
    entry = {"flops": flops(ticket, one), "flops_dense": flops(dense, one), "latency_ms": {}, "dense_latency_ms": {},
             "speedup": {}, "threads": torch.get_num_threads()}
    entry["flops_ratio"] = entry["flops_dense"] / max(entry["flops"], 1)
    for batch in BATCHES:
        x = torch.randn(batch, *input_shape, generator=generator)
        dense_ms, ticket_ms = time_pair(dense, ticket, x, repeats * 10 if batch == 1 else repeats)
        entry["dense_latency_ms"][str(batch)] = round(dense_ms, 5)
        entry["latency_ms"][str(batch)] = round(ticket_ms, 5)
        entry["speedup"][str(batch)] = round(dense_ms / ticket_ms, 4)
    return entry
