"""VGG with batch norm: cfg A (VGG-11) and E (VGG-19), global average pool, 3-layer classifier."""

from __future__ import annotations

from torch import nn

CFGS = {
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg19_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                 512, 512, 512, 512, "M"],
}


def vgg(name: str, num_classes: int, in_chans: int, width: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = in_chans
    for v in CFGS[name]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        cout = max(1, round(v * width))
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        cin = cout
    hidden = max(1, round(4096 * width))
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
                          nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
                          nn.Linear(hidden, num_classes))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model
