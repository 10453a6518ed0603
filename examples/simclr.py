"""SimCLR with fastntxent.NTXentLoss on scikit-learn's bundled 8x8 digits (offline).

Two augmented views of every image (random resized crop + Gaussian noise, batched torch
ops) go through a small conv encoder and a projection head; NT-Xent pulls the two views of
an image together. At the end a linear probe on the frozen encoder features is compared with
the same probe on the encoder at its random initialisation.

    python examples/simclr.py [--epochs 15] [--seed 0] [--quick]
"""
import argparse
import copy

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fastntxent as fx


def augment(x):
    """Random resized crop (scale 0.7-1, shift up to ±1.5 px) of (B, 1, 8, 8) images, plus noise."""
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = torch.empty(n, device=x.device).uniform_(0.7, 1.0)
    theta[:, :, 2] = torch.empty(n, 2, device=x.device).uniform_(-0.375, 0.375)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False) + 0.1 * torch.randn_like(x)


def linear_probe_accuracy(encoder, x_train, y_train, x_test, y_test, steps=200):
    """Test accuracy of a linear classifier trained on the frozen, standardised features."""
    encoder.eval()
    with torch.no_grad():
        f_train, f_test = encoder(x_train), encoder(x_test)
        mean, std = f_train.mean(0), f_train.std(0) + 1e-6
        f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    encoder.train()
    clf = nn.Linear(f_train.shape[1], 10).to(f_train.device)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):  # full batch
        loss = F.cross_entropy(clf(f_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (clf(f_test).argmax(1) == y_test).float().mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="3 epochs (for the tests)")
    args = p.parse_args()
    epochs = 3 if args.quick else args.epochs
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target)
    split = train_test_split(x, y, test_size=0.3, random_state=args.seed)
    x_train, x_test, y_train, y_test = (t.to(device) for t in split)

    encoder = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),  # 8x8 -> 4x4
        nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(),
    ).to(device)
    projector = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 32)).to(device)
    random_encoder = copy.deepcopy(encoder)  # the baseline: same architecture, untrained
    loss_fn = fx.NTXentLoss(temperature=args.temperature)
    opt = torch.optim.Adam([*encoder.parameters(), *projector.parameters()], lr=1e-3)

    losses = []
    for epoch in range(epochs):
        total = 0.0
        batches = x_train[torch.randperm(len(x_train), device=device)].split(args.batch_size)
        for xb in batches:
            z1, z2 = projector(encoder(augment(xb))), projector(encoder(augment(xb)))
            loss = loss_fn(z1, z2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total / len(batches))
        print(f"epoch {epoch + 1}/{epochs}  loss {losses[-1]:.4f}")

    acc = linear_probe_accuracy(encoder, x_train, y_train, x_test, y_test)
    acc_random = linear_probe_accuracy(random_encoder, x_train, y_train, x_test, y_test)
    print(f"initial_loss={losses[0]:.4f} final_loss={losses[-1]:.4f} "
          f"probe_acc={acc:.3f} random_init_probe_acc={acc_random:.3f}")


if __name__ == "__main__":
    main()
