"""The Attention U-Net (ResNet encoder) and its hybrid loss written in plain PyTorch.

This is the yardstick of ``scripts/benchmark.py model``: the same network as
:func:`xsight_keras.models.attention_unet` (same layers, same parameter count: 24,591,034 for
ResNet34 and 6 classes), trained with the same Dice + Focal + Boundary loss and AdamW, in the
idiomatic PyTorch way (``nn.Module``, fused ``nn.BatchNorm2d``, NCHW tensors). The benchmark
reports the Keras step time as a ratio of this one. Nothing in the library imports this file.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
_WIDTHS = (64, 128, 256, 512)
_EPS = 1e-6


def _conv_bn(cin, cout, kernel, stride=1, bias=False):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=bias), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.branch = nn.Sequential(_conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), _conv_bn(cout, cout, 3))
        self.shortcut = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.branch(x) + self.shortcut(x))


class AttentionGate(nn.Module):
    def __init__(self, skip_channels, gate_channels, inter):
        super().__init__()
        self.theta = _conv_bn(skip_channels, inter, 1)
        self.phi = _conv_bn(gate_channels, inter, 1, bias=True)
        self.psi = _conv_bn(inter, 1, 1, bias=True)

    def forward(self, skip, gate):
        return skip * torch.sigmoid(self.psi(F.relu(self.theta(skip) + self.phi(gate))))


class TorchAttentionUNet(nn.Module):
    """(B, C, H, W) float images → (B, K, H, W) softmax probabilities."""

    def __init__(self, num_classes=6, encoder="resnet34", decoder=(256, 128, 64, 32, 16), in_ch=3):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(in_ch, 64, 7, 2), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for width, n in zip(_WIDTHS, _BLOCKS[encoder]):
            blocks = [BasicBlock(cin if i == 0 else width, width, 2 if (i == 0 and width > 64) else 1)
                      for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.ModuleList(stages)
        skip_channels = (256, 128, 64, 64, None)
        self.gates, self.blocks, prev = nn.ModuleList(), nn.ModuleList(), 512
        for filters, skip in zip(decoder, skip_channels):
            self.gates.append(AttentionGate(skip, prev, max(skip // 2, 8)) if skip else nn.Identity())
            cin = prev + (skip or 0)
            self.blocks.append(nn.Sequential(_conv_bn(cin, filters, 3), nn.ReLU(inplace=True),
                                             _conv_bn(filters, filters, 3), nn.ReLU(inplace=True)))
            prev = filters
        self.head = nn.Conv2d(prev, num_classes, 1)

    def forward(self, x):
        x = self.stem(x)
        features = [x]
        x = self.pool(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        skips = features[-2::-1] + [None]
        d = features[-1]
        for gate, block, skip in zip(self.gates, self.blocks, skips):
            d = F.interpolate(d, scale_factor=2, mode="nearest")
            if skip is not None:
                d = torch.cat([d, gate(skip, d)], 1)
            d = block(d)
        return torch.softmax(self.head(d).float(), 1)


def _boundaries(mask, size):
    inverted = 1.0 - mask
    return F.max_pool2d(inverted, size, 1, size // 2) - inverted


def hybrid_loss(y_true, y_pred, gamma=2.0, alpha=0.25, theta0=3, theta=5):
    """Dice + Focal + 0.5 · Boundary on (B, K, H, W) one-hot targets and probabilities."""
    axes = (0, 2, 3)
    dice = (2 * (y_true * y_pred).sum(axes) + 1) / (y_true.sum(axes) + y_pred.sum(axes) + 1)
    p = y_pred.clamp(_EPS, 1 - _EPS)
    focal = (-alpha * y_true * (1 - p) ** gamma * torch.log(p)).sum(1).mean()
    gt_b, pred_b = _boundaries(y_true, theta0), _boundaries(y_pred, theta0)
    gt_ext, pred_ext = F.max_pool2d(gt_b, theta, 1, theta // 2), F.max_pool2d(pred_b, theta, 1, theta // 2)
    precision = (pred_b * gt_ext).sum(axes) / (pred_b.sum(axes) + _EPS)
    recall = (pred_ext * gt_b).sum(axes) / (gt_b.sum(axes) + _EPS)
    bf1 = 2 * precision * recall / (precision + recall + _EPS)
    return (1 - dice.mean()) + focal + 0.5 * (1 - bf1.mean())


def make_train_step(model, lr=1e-3, amp_dtype=None, device="cpu", compile=False):
    """A closure ``step(x, y) -> loss`` doing forward, loss, backward and an AdamW update.

    ``amp_dtype``: ``torch.float16`` (with a GradScaler) or ``torch.bfloat16`` autocast, or None.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.004)
    scaler = torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)
    forward = torch.compile(model) if compile else model

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = hybrid_loss(y, forward(x))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    return step
