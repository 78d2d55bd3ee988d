"""Continuous Sparsification in one round: sparsify a small MLP, train weights and masks together
while beta rises from 1 to beta_final, then switch to the ticket (hard) mask and report.

    python examples/quickstart.py            # about 12 seconds on 2 CPU cores

The data is generated here: inputs x ~ N(0, I) labelled by a random "teacher" network that
reads only a few of the input features, so a much sparser network than the student can fit it.
"""

import argparse
import time

import torch
from torch import nn
from tqdm import tqdm

import csext


def make_data(n: int, features: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(features, classes, generator=g)
    teacher[torch.randperm(features, generator=g)[features // 8:]] = 0  # only 1 in 8 features matter
    x = torch.randn(n, features, generator=g)
    y = (x @ teacher + 0.1 * torch.randn(n, classes, generator=g)).argmax(1)
    return x, y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def mlp(features: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, classes))


def train(model, x, y, epochs: int, optimizer, on_epoch=lambda epoch: None, desc: str = "train") -> None:
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch"):
        on_epoch(epoch)
        model.train()
        for batch in torch.randperm(len(x)).split(128):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15, help="T, the epochs of the round")
    parser.add_argument("--beta-final", type=float, default=200.0, help="beta_T, reached at the last epoch")
    parser.add_argument("--mask-init", type=float, default=0.0, help="s0 (negative: sparser tickets)")
    parser.add_argument("--penalty", type=float, default=1e-4, help="lam, the weight of sum(sigmoid(beta * s))")
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (beta goes from 1 at the first epoch to beta_final at the last)")

    torch.manual_seed(args.seed)
    features, classes = 64, 10
    x, y = make_data(args.train_size + 5000, features, classes, args.seed)
    x_train, y_train, x_test, y_test = x[: args.train_size], y[: args.train_size], x[args.train_size:], y[args.train_size:]

    dense = mlp(features, classes)  # the same network unpruned, for comparison
    train(dense, x_train, y_train, args.epochs, torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9), desc="dense")
    dense_acc = accuracy(dense, x_test, y_test)

    start = time.perf_counter()
    model = mlp(features, classes)
    gated = csext.sparsify(model, mask_init=args.mask_init, penalty=args.penalty)  # lam is applied in the backward
    print(f"gated layers: {len(gated)}, backend: {csext.backends.resolve('auto', 'cpu')}")
    weights = [p for n, p in model.named_parameters() if not n.endswith("mask_logits")]
    masks = [m.mask_logits for m in gated]
    optimizer = torch.optim.SGD([{"params": weights}, {"params": masks}], lr=0.1, momentum=0.9)

    def anneal(epoch: int) -> None:
        csext.set_beta(model, args.beta_final ** (epoch / (args.epochs - 1)))  # docs/contract.md section 1 schedule

    train(model, x_train, y_train, args.epochs, optimizer, on_epoch=anneal, desc="CS round")
    soft_acc = accuracy(model, x_test, y_test)

    csext.set_hard(model)  # the ticket: the hard mask s > 0
    ticket_acc = accuracy(model, x_test, y_test)
    report = csext.sparsity_report(model)
    print(report)
    print(f"test accuracy: dense {dense_acc:.3f}; CS soft mask {soft_acc:.3f}, ticket (hard mask) "
          f"{ticket_acc:.3f} with {report.remaining:.2%} of the weights; CS took {time.perf_counter() - start:.1f} s")
    return {"remaining": report.remaining, "dense_acc": dense_acc, "soft_acc": soft_acc, "ticket_acc": ticket_acc}


if __name__ == "__main__":
    main()
