"""CLIP-style training of two towers with fastntxent.ClipLoss and its learnable logit scale.

Paired synthetic data: a latent s ~ N(0, I) is seen through two different noisy linear maps,
an "image" view (64-d) and a "text" view (48-d). One MLP tower per view maps it to a shared
32-d embedding; the symmetric CLIP loss matches each pair against all others in the batch.
The logit scale (initialised to CLIP's 1/0.07) is a parameter of the loss, trained with the
towers. Retrieval top-1 on held-out pairs comes from `return_stats=True`.

    python examples/clip.py [--steps 300] [--seed 0] [--quick]
"""
import argparse

import torch
from torch import nn

import fastntxent as fx


def tower(dim_in, dim_out=32):
    return nn.Sequential(nn.Linear(dim_in, 128), nn.ReLU(), nn.Linear(128, dim_out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--noise", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="100 steps (for the tests)")
    args = p.parse_args()
    steps = 100 if args.quick else args.steps
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    latent_dim = 16
    to_image, to_text = torch.randn(latent_dim, 64, device=device), torch.randn(latent_dim, 48, device=device)

    def sample_pairs(n):
        s = torch.randn(n, latent_dim, device=device)
        image = s @ to_image + args.noise * torch.randn(n, 64, device=device)
        text = s @ to_text + args.noise * torch.randn(n, 48, device=device)
        return image, text

    image_tower, text_tower = tower(64).to(device), tower(48).to(device)
    loss_fn = fx.ClipLoss().to(device)  # learnable logit scale, clamped at 100 like CLIP
    params = [*image_tower.parameters(), *text_tower.parameters(), *loss_fn.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    held_out = sample_pairs(1024)

    @torch.no_grad()
    def evaluate():
        image, text = held_out
        loss, stats = loss_fn(image_tower(image), text_tower(text), return_stats=True)
        return loss.item(), stats["top1_accuracy"].item()

    initial_loss, initial_top1 = evaluate()
    print(f"step 0  held-out loss {initial_loss:.4f}  top-1 {initial_top1:.3f}  "
          f"logit scale {loss_fn.logit_scale.item():.2f}")
    for step in range(1, steps + 1):
        image, text = sample_pairs(args.batch_size)
        loss = loss_fn(image_tower(image), text_tower(text))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            held_loss, top1 = evaluate()
            print(f"step {step}  train loss {loss.item():.4f}  held-out loss {held_loss:.4f}  "
                  f"top-1 {top1:.3f}  logit scale {loss_fn.logit_scale.item():.2f}")

    print(f"initial_loss={initial_loss:.4f} final_loss={held_loss:.4f} "
          f"logit_scale={loss_fn.logit_scale.item():.2f} top1={top1:.3f}")


if __name__ == "__main__":
    main()
