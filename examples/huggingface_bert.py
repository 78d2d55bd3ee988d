"""CS on a Hugging Face transformers model, and back to plain transformers.

    python examples/huggingface_bert.py --out runs/bert-ticket

A small BERT classifier is built from a config (nothing is downloaded), every nn.Linear in it
is gated with csext.sparsify, it trains a few hundred steps on a synthetic task with beta
annealed per step. Halfway it is saved with save_pretrained, as Trainer saves its checkpoints
(the gated layers' state is tensors only, which safetensors requires), and training goes on
from that checkpoint loaded into a fresh gated model. At the end the ticket is finalized (plain
nn.Linear layers holding w * 1[s > 0]), saved with save_pretrained, reloaded with plain
transformers, and checked to give the same outputs as the finalized model.
"""

import argparse
import tempfile

import torch

import csext


def synthetic_batch(generator, batch: int, length: int, vocab: int):
    """Token sequences labelled by their first token modulo 3 (read through the pooler)."""
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    return ids, ids[:, 0] % 3


def main(argv=None) -> dict:
    from transformers import BertConfig, BertForSequenceClassification

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--penalty", type=float, default=1e-5, help="lam")
    parser.add_argument("--beta-final", type=float, default=200.0)
    parser.add_argument("--out", default=None, help="folder for save_pretrained (default: a temporary one)")
    args = parser.parse_args(argv)

    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3)

    def gated_bert():
        model = BertForSequenceClassification(config)
        gated = csext.sparsify(model, penalty=args.penalty)  # lam applied in the backward
        masks = [m.mask_logits for m in gated]
        others = [p for n, p in model.named_parameters() if not n.endswith("mask_logits")]
        groups = [{"params": others, "weight_decay": 0.01}, {"params": masks, "weight_decay": 0.0}]
        return model.train(), torch.optim.AdamW(groups, lr=1e-3)

    model, optimizer = gated_bert()
    generator = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        if step == args.steps // 2:  # a checkpoint, and training resumed from it in a new model
            with tempfile.TemporaryDirectory() as checkpoint:
                model.save_pretrained(checkpoint)
                torch.save(optimizer.state_dict(), f"{checkpoint}/optimizer.pt")
                model, optimizer = gated_bert()
                model.load_state_dict(load_file(f"{checkpoint}/model.safetensors"))  # beta, hard, lam too
                optimizer.load_state_dict(torch.load(f"{checkpoint}/optimizer.pt"))
        csext.set_beta(model, csext.schedule.beta_at(step, args.steps, args.beta_final))  # per-step schedule
        ids, labels = synthetic_batch(generator, 32, 24, config.vocab_size)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    csext.set_hard(model)
    report = csext.sparsity_report(model)
    model.eval()
    test_ids, test_labels = synthetic_batch(torch.Generator().manual_seed(1), 256, 24, config.vocab_size)
    with torch.no_grad():
        ticket_logits = model(input_ids=test_ids).logits
    csext.finalize(model)  # plain nn.Linear layers: a model transformers knows
    with torch.no_grad():
        finalized_logits = model(input_ids=test_ids).logits
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.out or scratch
        model.save_pretrained(folder)
        reloaded = BertForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            reloaded_logits = reloaded(input_ids=test_ids).logits
    accuracy = (finalized_logits.argmax(1) == test_labels).float().mean().item()
    print(f"{report.remaining:.2%} of the {report.total} gated weights remain; test accuracy {accuracy:.3f}")
    print(f"reloaded with plain transformers: max |difference| {(reloaded_logits - finalized_logits).abs().max():.2e}")
    return {"remaining": report.remaining, "accuracy": accuracy, "ticket": ticket_logits,
            "finalized": finalized_logits, "reloaded": reloaded_logits}


if __name__ == "__main__":
    main()
