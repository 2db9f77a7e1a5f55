"""Small-image ViT: patch = image/8 (8x8 grid), CLS token, learned positions, pre-LN blocks, token mean."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import InputError

SIZES = {"vit_ett": (8, 6, 192, 576), "vit_b": (12, 12, 768, 3072)}  # layers, heads, dim, mlp


class PatchEmbed(nn.Module):
    """Patches + CLS token + positions: generalized layer 0, a (B, 1 + grid^2, dim) token tensor."""

    is_gen_layer = True

    def __init__(self, in_chans: int, image_size: int, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)
        nn.init.trunc_normal_(self.proj.weight, std=math.sqrt(1 / (in_chans * patch * patch)))
        nn.init.zeros_(self.proj.bias)
        tokens = (image_size // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos


class EncoderBlock(nn.Module):
    is_gen_layer = True

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))
        # as the reference's torch modules start: attention's in/out projections, then torchvision's MLP block
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)
        for linear in (self.mlp[0], self.mlp[2]):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


class TokenMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def vit(name: str, num_classes: int, in_chans: int, image_size: int, width: float) -> nn.Sequential:
    if image_size % 8:
        raise InputError(f"{name} needs an image size divisible by 8 (8x8 patches), not {image_size}")
    depth, heads, dim, mlp = SIZES[name]
    dim = max(heads, round(dim * width / heads) * heads)
    mlp = max(1, round(mlp * width))
    head = nn.Linear(dim, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(PatchEmbed(in_chans, image_size, image_size // 8, dim),
                         *[EncoderBlock(dim, heads, mlp) for _ in range(depth)],
                         nn.LayerNorm(dim, eps=1e-6), TokenMean(), head)
