"""Encoders (small CNN for digits, torchvision ResNet-18/50 with an optional CIFAR stem) and
projection heads."""
from __future__ import annotations

from torch import nn


class DigitsCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers, one 2x2 max-pool, global average pooling: 4*width features.

    The global pooling matters for the baseline comparison: a random-init network with it
    discards the spatial layout, so the pretrained encoder must learn what makes a digit.
    """

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(*block(in_channels, w), *block(w, 2 * w), nn.MaxPool2d(2),
                                      *block(2 * w, 4 * w), *block(4 * w, 4 * w),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 4 * w

    def forward(self, x):
        return self.features(x)


def resnet(arch: str, cifar_stem: bool, in_channels: int = 3) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:  # 3x3 stride-1 first conv, no max-pool (32x32 images)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def build_backbone(cfg, in_channels: int) -> nn.Module:
    if cfg.arch == "digits_cnn":
        return DigitsCNN(in_channels, cfg.width)
    return resnet(cfg.arch, cfg.cifar_stem, in_channels)


def projection_head(in_dim: int, hidden: int, out: int, batch_norm: bool = True) -> nn.Sequential:
    """SimCLR: Linear-BN-ReLU-Linear; MoCo v2: Linear-ReLU-Linear (batch_norm=False)."""
    layers = [nn.Linear(in_dim, hidden)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out)]
    return nn.Sequential(*layers)
