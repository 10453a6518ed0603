"""Evaluation on frozen features: a weighted kNN monitor (Wu et al. 2018) and a linear probe
(multinomial logistic regression, full-batch L-BFGS on standardised features).

Nothing here draws random numbers, so evaluating during training leaves the run's RNG
streams, and therefore resume-exactness, untouched.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .data import eval_batches


@torch.no_grad()
def extract_features(backbone, bundle, split: str, device, autocast=contextlib.nullcontext,
                     num_workers: int = 0):
    """(N, F) float32 features of the split's images and their (N,) labels, in eval mode."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for x, y in eval_batches(bundle, split, device, num_workers=num_workers):
            with autocast():
                f = backbone(x)
            feats.append(f.float())
            labels.append(y.to(device))
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN on cosine similarity: votes exp(sim / T) from the k nearest train features."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    correct = 0
    for i in range(0, len(test_f), chunk):
        sim = test_f[i:i + chunk] @ train_f.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (top / temperature).exp())
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return correct / len(test_f)


def linear_probe(train_f, train_y, test_f, test_y, num_classes: int, weight_decay: float = 1e-4,
                 max_iter: int = 500) -> dict:
    """Multinomial logistic regression on frozen, standardised features; returns accuracies."""
    train_f, test_f = train_f.double(), test_f.double()
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xtr, xte = (train_f - mu) / sd, (test_f - mu) / sd
    W = torch.zeros(xtr.shape[1], num_classes, dtype=xtr.dtype, device=xtr.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=xtr.dtype, device=xtr.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ W + b, train_y) + weight_decay * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        train_acc = ((xtr @ W + b).argmax(1) == train_y).double().mean().item()
        test_acc = ((xte @ W + b).argmax(1) == test_y).double().mean().item()
    return {"train_accuracy": train_acc, "test_accuracy": test_acc}


def evaluate_backbone(backbone, bundle, device, cfg, probe: bool,
                      autocast=contextlib.nullcontext) -> dict:
    """{"knn_accuracy"} and, with probe, {"probe_accuracy", "probe_train_accuracy"} (test and
    train accuracy of the linear probe); `autocast` is a context-manager factory."""
    tr_f, tr_y = extract_features(backbone, bundle, "train", device, autocast, cfg.num_workers)
    te_f, te_y = extract_features(backbone, bundle, "test", device, autocast, cfg.num_workers)
    out = {"knn_accuracy": knn_accuracy(tr_f, tr_y, te_f, te_y, bundle.num_classes, cfg.knn_k,
                                        cfg.knn_temperature)}
    if probe:
        p = linear_probe(tr_f, tr_y, te_f, te_y, bundle.num_classes, cfg.probe_weight_decay)
        out["probe_accuracy"] = p["test_accuracy"]
        out["probe_train_accuracy"] = p["train_accuracy"]
    return out
