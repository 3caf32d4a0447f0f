"""The Cosilo U-Net, its loss, initialisation and optimiser in PyTorch: the one definition that
`bench/train_vs_pytorch.py` (CPU, against the candle step) and `bench/gpu/torch_step.py` (GPU)
both import, so the two PyTorch sides cannot drift apart.

The same network, loss and optimiser as `appliance/train` (cosilo-train): per level two blocks of
conv3x3 pad 1 -> GroupNorm(4, eps 1e-5) -> ReLU with base << level channels, 2x2 max-pool written
as reshape + amax (as the candle model pools), ConvTranspose2d(k2, s2) up, concatenation
[skip, up] on channels, 1x1 head; loss = log-softmax cross-entropy + (1 - mean soft Dice over
classes 1..C, smoothing 1, over the whole batch); AdamW lr 2e-3, betas 0.9/0.999, eps 1e-8,
weight decay 1e-4 on convolution weights only. Initialisation: Kaiming-normal weights, zero
biases, GroupNorm scales one.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSES = 5
GROUPS = 4


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.GroupNorm(GROUPS, cout, eps=1e-5)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class Level(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.a = Block(cin, cout)
        self.b = Block(cout, cout)

    def forward(self, x):
        return self.b(self.a(x))


class UNet(nn.Module):
    def __init__(self, base=16, depth=3):
        super().__init__()
        self.depth = depth
        width = [base << l for l in range(depth + 1)]
        self.enc = nn.ModuleList([Level(1 if l == 0 else width[l - 1], width[l]) for l in range(depth + 1)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(width[l + 1], width[l], 2, stride=2) for l in range(depth)])
        self.dec = nn.ModuleList([Level(2 * width[l], width[l]) for l in range(depth)])
        self.head = nn.Conv2d(width[0], CLASSES, 1)

    def forward(self, x):
        skips = []
        for l, level in enumerate(self.enc):
            x = level(x)
            if l < self.depth:
                skips.append(x)
                b, c, hh, ww = x.shape
                # The same reshape max-pool as the candle model.
                x = x.reshape(b, c, hh // 2, 2, ww // 2, 2).amax(dim=(3, 5))
        for l in reversed(range(self.depth)):
            x = self.dec[l](torch.cat([skips[l], self.up[l](x)], dim=1))
        return self.head(x)


def loss_fn(logits, one_hot):
    b, c, hh, ww = logits.shape
    log_p = F.log_softmax(logits, dim=1)
    ce = -(log_p * one_hot).sum() / (b * hh * ww)
    p = log_p.exp()
    inter = (p * one_hot).sum(dim=(0, 2, 3))
    denom = p.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + (1 - dice[1:].mean())


def initialise(net):
    """Kaiming-normal weights, zero biases, GroupNorm scales one (in place)."""
    for name, p in net.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif ".norm" in name:
            nn.init.ones_(p)
        else:
            nn.init.kaiming_normal_(p)


def adamw(net):
    """AdamW with weight decay on the convolution weights only."""
    decay = [p for n, p in net.named_parameters() if n.endswith("weight") and ".norm" not in n]
    rest = [p for n, p in net.named_parameters() if not (n.endswith("weight") and ".norm" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}],
        lr=2e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
    )


def batch(size_b, h, w, device=None):
    """A random input batch and random labels as one-hot targets."""
    x = torch.rand(size_b, 1, h, w, device=device)
    labels = torch.randint(0, CLASSES, (size_b, h, w), device=device)
    one_hot = F.one_hot(labels, CLASSES).permute(0, 3, 1, 2).float().contiguous()
    return x, labels, one_hot
