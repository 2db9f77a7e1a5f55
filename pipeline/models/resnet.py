"""CIFAR-style ResNets (3x3 stride-1 stem): ResNet-9 = BasicBlocks [1,1,1,1], ResNet-34 = [3,4,6,3]."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    is_gen_layer = True  # a whole residual block is one generalized layer

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(blocks: list[int], num_classes: int, in_chans: int, image_size: int, width: float) -> nn.Sequential:
    widths = [max(1, round(w * width)) for w in (64, 128, 256, 512)]
    stem = [nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    if image_size >= 64:  # TinyImageNet keeps the max-pool, CIFAR drops it
        stem.append(nn.MaxPool2d(3, 2, 1))
    stages, cin = [], widths[0]
    for i, (n, cout) in enumerate(zip(blocks, widths)):
        stride = 1 if i == 0 else 2
        stages.append(nn.Sequential(*[BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1)
                                      for j in range(n)]))
        cin = cout
    model = nn.Sequential(*stem, *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model
