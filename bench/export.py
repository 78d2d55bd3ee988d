"""Inference of an exported ticket (csext.export.to_sparse, CSR linear layers) against the same
ticket as a finalized dense model, at 10% and 2% of the weights remaining.

    python bench/export.py [--device cpu]

Medians of repeated forwards under no_grad, providers interleaved within one process; prints a
table and writes bench/results/export-<device>.json (atomically) with machine, versions, commit.
"""

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as harness  # noqa: E402  (bench/run.py: the machine line and commit)

import csext  # noqa: E402
from csext import export  # noqa: E402
from csext.experiments.files import write_atomic  # noqa: E402

MODELS = {  # name: (layer widths, batch sizes)
    "lenet300": ([784, 300, 100, 10], [1, 256]),
    "mlp-4096": ([4096, 4096, 4096, 10], [1, 32, 256]),
}


def ticket(widths, remaining: float, seed: int = 0) -> nn.Module:
    """A gated MLP whose hard mask keeps the `remaining` fraction of each layer's largest |w|."""
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    for m in csext.sparsify(model):
        with torch.no_grad():
            threshold = m.weight.abs().flatten().kthvalue(int((1 - remaining) * m.weight.numel())).values
            m.mask_logits.copy_(m.weight.abs() - threshold)
    csext.set_hard(model)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    clock = harness.Clock(device)
    info = harness.machine_info(device)
    rows = []
    for name, (widths, batches) in MODELS.items():
        for remaining in (0.1, 0.02):
            gated = ticket(widths, remaining)
            dense = csext.finalize(copy.deepcopy(gated)).to(device).eval()
            sparse = export.to_sparse(copy.deepcopy(gated)).to(device).eval()
            for batch in batches:
                x = torch.randn(batch, widths[0], device=device)
                with torch.no_grad():
                    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-4)
                    for _ in range(3):
                        dense(x), sparse(x)
                    times = {"dense": [], "sparse": []}
                    for r in range(args.repeats):  # interleaved: drift hits both alike
                        for label, model in (("dense", dense), ("sparse", sparse))[:: 1 if r % 2 else -1]:
                            times[label].append(clock.time(lambda: model(x)))
                dense_ms, sparse_ms = statistics.median(times["dense"]), statistics.median(times["sparse"])
                rows.append({"model": name, "remaining": remaining, "batch": batch, "dense_ms": round(dense_ms, 4),
                             "sparse_ms": round(sparse_ms, 4), "speedup": round(dense_ms / sparse_ms, 3)})
    print(f"{info['machine']} | torch {info['torch']} | {info['threads']} threads | commit {info['commit']} | {info['run']}")
    print("| model | remaining | batch | dense (finalized) | sparse (CSR) | speedup |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['remaining']:.0%} | {r['batch']} | {r['dense_ms']:.3f} ms | {r['sparse_ms']:.3f} ms | {r['speedup']:.2f}x |")
    out = args.out or HERE / "results" / f"export-{device.type}.json"
    write_atomic(out, (json.dumps({"machine": info, "rows": rows}, indent=1) + "\n").encode())
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
