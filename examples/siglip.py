"""SigLIP-style training of two towers with fastntxent.SigLipLoss on scikit-learn's digits (offline).

Each 8x8 digit is seen as two differently augmented views (pixel noise, and for the second
view 20 % random pixel dropout); each view has its own tower (an
MLP to a shared 32-d embedding), and the pairwise sigmoid loss scores every image-view /
text-view pair of the batch on its own (positive on the diagonal, negative elsewhere). The
logit scale t = exp(t') and bias b are parameters of the loss, initialised as open_clip does
(t' = log 10, b = −10). Retrieval top-1 (is a held-out first view's nearest second view its
own?) rises with training.

    python examples/siglip.py [--steps 300] [--seed 0] [--quick]
"""
import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import fastntxent as fx


def tower(dim_out=32):
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, dim_out))


def augment(images, generator, dropout=0.0):
    """Gaussian pixel noise and, optionally, random pixel dropout: (n, 8, 8) → (n, 64)."""
    out = images.reshape(images.shape[0], 64)
    out = out + 0.1 * torch.randn(out.shape, generator=generator)
    if dropout:
        out = out * (torch.rand(out.shape, generator=generator) > dropout)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="100 steps (for the tests)")
    args = p.parse_args()
    steps = 100 if args.quick else args.steps
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    perm = torch.randperm(images.shape[0], generator=gen)
    train, test = images[perm[:1297]], images[perm[1297:]]
    held_a, held_b = augment(test, gen), augment(test, gen, dropout=0.2)  # fixed held-out views

    tower_a, tower_b = tower(), tower()
    loss_fn = fx.SigLipLoss()  # learnable t' = log t and b, open_clip's initial values
    opt = torch.optim.Adam([*tower_a.parameters(), *tower_b.parameters(), *loss_fn.parameters()], lr=1e-3)

    @torch.no_grad()
    def evaluate():
        a, b = tower_a(held_a), tower_b(held_b)
        cos = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
        top1 = (cos.argmax(1) == torch.arange(a.shape[0])).float().mean()
        return loss_fn(a, b).item(), top1.item()

    initial_loss, initial_top1 = evaluate()
    print(f"step 0  held-out loss {initial_loss:.4f}  retrieval top-1 {initial_top1:.3f}  "
          f"t {loss_fn.logit_scale.item():.2f}  b {loss_fn.logit_bias.item():.2f}")
    for step in range(1, steps + 1):
        batch = train[torch.randint(0, train.shape[0], (args.batch_size,), generator=gen)]
        loss = loss_fn(tower_a(augment(batch, gen)), tower_b(augment(batch, gen, dropout=0.2)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            held_loss, top1 = evaluate()
            print(f"step {step}  train loss {loss.item():.4f}  held-out loss {held_loss:.4f}  "
                  f"retrieval top-1 {top1:.3f}  t {loss_fn.logit_scale.item():.2f}  b {loss_fn.logit_bias.item():.2f}")

    print(f"initial_loss={initial_loss:.4f} final_loss={held_loss:.4f} initial_top1={initial_top1:.3f} "
          f"top1={top1:.3f} logit_scale={loss_fn.logit_scale.item():.2f} logit_bias={loss_fn.logit_bias.item():.2f}")


if __name__ == "__main__":
    main()
