"""Projectors from student to teacher channels: one 1x1 convolution (the method) or SemCKD/SimKD's three layers."""

from __future__ import annotations

from torch import nn


def single_layer(cin: int, cout: int, dims: int) -> nn.Module:
    """1x1 convolution, no bias, no norm, no activation, PyTorch default init."""
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    return conv(cin, cout, 1, bias=False)


def three_layer(cin: int, cout: int, dims: int) -> nn.Module:
    """1x1 conv to 2*cout, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv to cout; no biases."""
    conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
    mid = 2 * cout
    return nn.Sequential(conv(cin, mid, 1, bias=False), norm(mid), nn.ReLU(inplace=True),
                         conv(mid, mid, 3, padding=1, bias=False), norm(mid), nn.ReLU(inplace=True),
                         conv(mid, cout, 1, bias=False))


PROJECTORS = {"single": single_layer, "three": three_layer}
