"""Supervised contrastive learning (SupCon) with fastntxent.SupConLoss on scikit-learn's digits.

Every image in a batch appears as two augmented views (random 8x8 crop of the zero-padded
image + noise); all views with the same label are positives of each other. At the end each
test image is classified by the nearest class mean of the train features (cosine), which
SupCon's class-clustered features are made for, beside the same classifier on raw pixels.

    python examples/supcon.py [--epochs 15] [--seed 0] [--quick]
"""
import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fastntxent as fx


def augment(x, pad=1, noise=0.1):
    """Random crop of the zero-padded (B, 64) flattened 8x8 images, i.e. a shift of up to ±pad px."""
    n = len(x)
    padded = F.pad(x.view(n, 8, 8), (pad,) * 4)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n, 1, 1), device=x.device)
    r = torch.arange(8, device=x.device)
    crop = padded[torch.arange(n, device=x.device).view(n, 1, 1), dy + r.view(8, 1), dx + r]
    return crop.flatten(1) + noise * torch.randn_like(x)


def nearest_mean_accuracy(f_train, y_train, f_test, y_test):
    """Test accuracy of classifying each row by the closest (cosine) class mean of the train rows."""
    f_train, f_test = F.normalize(f_train, dim=1), F.normalize(f_test, dim=1)
    means = F.normalize(torch.stack([f_train[y_train == c].mean(0) for c in range(10)]), dim=1)
    return ((f_test @ means.T).argmax(1) == y_test).float().mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="3 epochs (for the tests)")
    args = p.parse_args()
    epochs = 3 if args.quick else args.epochs
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # (1797, 64) in [0, 1]
    y = torch.tensor(digits.target)
    split = train_test_split(x, y, test_size=0.3, random_state=args.seed)
    x_train, x_test, y_train, y_test = (t.to(device) for t in split)

    encoder = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU()).to(device)
    projector = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 32)).to(device)
    loss_fn = fx.SupConLoss(temperature=args.temperature)
    opt = torch.optim.Adam([*encoder.parameters(), *projector.parameters()], lr=1e-3)

    losses = []
    for epoch in range(epochs):
        total = 0.0
        perm = torch.randperm(len(x_train), device=device)
        batches = list(zip(x_train[perm].split(args.batch_size), y_train[perm].split(args.batch_size)))
        for xb, yb in batches:
            z = projector(encoder(torch.cat([augment(xb), augment(xb)])))  # (2B, 32): both views
            loss = loss_fn(z, torch.cat([yb, yb]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total / len(batches))
        print(f"epoch {epoch + 1}/{epochs}  loss {losses[-1]:.4f}")

    with torch.no_grad():
        acc = nearest_mean_accuracy(encoder(x_train), y_train, encoder(x_test), y_test)
    acc_pixels = nearest_mean_accuracy(x_train, y_train, x_test, y_test)  # baseline: raw pixels
    print(f"initial_loss={losses[0]:.4f} final_loss={losses[-1]:.4f} "
          f"nearest_mean_acc={acc:.3f} raw_pixels_nearest_mean_acc={acc_pixels:.3f}")


if __name__ == "__main__":
    main()
