"""MoCo v2 with fastntxent.InfoNCELoss and fastntxent.MemoryQueue on scikit-learn's digits.

A query encoder is trained by SGD; the key encoder is its exponential moving average
(momentum update, no gradient). Each query's positive is the key of another augmentation of
the same image, its negatives are the keys of earlier batches held in a MemoryQueue. The
order of one step is MoCo's: loss against `queue.keys`, `queue.enqueue(k)`, then backward.
The queue starts with random keys, which are easy negatives: the loss rises for an epoch
while real keys replace them, then falls.

    python examples/moco_v2.py [--epochs 15] [--seed 0] [--quick]
"""
import argparse
import copy

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import fastntxent as fx


def augment(x):
    """Random shift (up to ±1 px, zero fill) of (B, 64) flattened 8x8 images, plus noise."""
    n = x.shape[0]
    theta = torch.eye(2, 3, device=x.device).repeat(n, 1, 1)
    theta[:, :, 2] = torch.empty(n, 2, device=x.device).uniform_(-0.25, 0.25)
    img = x.view(n, 1, 8, 8)
    img = F.grid_sample(img, F.affine_grid(theta, list(img.shape), align_corners=False), align_corners=False)
    return img.flatten(1) + 0.1 * torch.randn_like(x)


@torch.no_grad()
def momentum_update(key_encoder, query_encoder, m):
    for k, q in zip(key_encoder.parameters(), query_encoder.parameters()):
        k.mul_(m).add_(q.detach(), alpha=1 - m)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--queue-size", type=int, default=512)
    p.add_argument("--momentum", type=float, default=0.99)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="5 epochs (for the tests)")
    args = p.parse_args()
    epochs = 5 if args.quick else args.epochs
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    x = torch.tensor(load_digits().data, dtype=torch.float32, device=device) / 16.0  # (1797, 64)
    # No BatchNorm, so single-device training needs no MoCo "shuffling BN".
    query_encoder = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),  # backbone
        nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 32),  # MoCo v2 MLP head
    ).to(device)
    key_encoder = copy.deepcopy(query_encoder).requires_grad_(False)
    queue = fx.MemoryQueue(dim=32, size=args.queue_size).to(device)
    loss_fn = fx.InfoNCELoss(temperature=args.temperature)
    opt = torch.optim.Adam(query_encoder.parameters(), lr=1e-3)

    losses = []
    for epoch in range(epochs):
        total, top1 = 0.0, 0.0
        batches = x[torch.randperm(len(x), device=device)].split(args.batch_size)
        for xb in batches:
            q = query_encoder(augment(xb))
            with torch.no_grad():
                momentum_update(key_encoder, query_encoder, args.momentum)
                k = F.normalize(key_encoder(augment(xb)), dim=1)  # the queue stores unit keys
            loss, stats = loss_fn(q, k, queue.keys, return_stats=True)
            queue.enqueue(k)  # before backward, as in MoCo: the loss has its own copy
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, top1 = total + loss.item(), top1 + stats["top1_accuracy"].item()
        losses.append(total / len(batches))
        print(f"epoch {epoch + 1}/{epochs}  loss {losses[-1]:.4f}  "
              f"top-1 (positive vs queue) {top1 / len(batches):.3f}")

    print(f"initial_loss={losses[0]:.4f} final_loss={losses[-1]:.4f} top1={top1 / len(batches):.3f}")


if __name__ == "__main__":
    main()
