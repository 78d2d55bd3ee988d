"""Data-parallel search under `torchrun`: DistributedDataParallel on PyTorch's own engine (gloo
on CPU, NCCL on GPU). Every rank reads the same shuffled order and takes its share of each
batch, DDP averages the gradients (mask logits' included), so weights and masks stay identical
on every rank; only rank 0 writes files.

    torchrun --nproc-per-node 2 -m csext search --out runs/ddp ...
"""

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


_independent = False  # inside independent(): this rank works alone


def active() -> bool:
    return not _independent and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def independent():
    """Within the block this rank runs on its own: no DDP, no sharding, and it writes its files
    (the sweep's runs, each a whole search)."""
    global _independent
    _independent = True
    try:
        yield
    finally:
        _independent = False


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def wrap(model: nn.Module) -> nn.Module:
    """`model` in DistributedDataParallel when running distributed (it shares the parameters)."""
    if not active():
        return model
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's share of a batch of indices (all ranks hold the same batch)."""
    return batch[rank()::world_size()] if active() else batch


@torch.no_grad()
def assert_same_on_all_ranks(model: nn.Module, what: str = "mask logits") -> None:
    """Raise if the mask logits (hard masks and values) differ between ranks."""
    if not active():
        return
    logits = [p for n, p in model.named_parameters() if n.endswith("mask_logits")]
    if not logits:
        return
    flat = torch.cat([p.detach().flatten().double() for p in logits])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    digest = torch.stack([(flat * weights).sum(), ((flat > 0).double() * weights).sum()])
    gathered = [torch.empty_like(digest) for _ in range(world_size())]
    dist.all_gather(gathered, digest)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"{what} differ between ranks: {[g.tolist() for g in gathered]}")


def barrier() -> None:
    if active():
        dist.barrier()


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
