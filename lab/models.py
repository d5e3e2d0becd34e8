"""Models for train.py: torchvision ResNets with the CIFAR stem, WideResNet, and SAM-ON (an optimizer that
perturbs the normalization layers only, chosen by module type)."""

import re

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import ssam


# -----------------------------------------------------------------------------------------------------------
# Models: torchvision ResNets (CIFAR stem: 3x3 stride-1 conv, no max-pool, §5.1) and WideResNet.
# -----------------------------------------------------------------------------------------------------------
class WideBlock(nn.Module):
    """Pre-activation basic block of WideResNet (Zagoruyko & Komodakis 2016), no dropout."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (
            None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        )

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 images: depth = 6n + 4, widths 16, 16k, 32k, 64k."""

    def __init__(self, depth, k, num_classes):
        super().__init__()
        n, widths = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(
            *[
                WideBlock(
                    widths[s] if i == 0 else widths[s + 1],
                    widths[s + 1],
                    (1 if s == 0 else 2) if i == 0 else 1,
                )
                for s in range(3)
                for i in range(n)
            ]
        )
        self.bn, self.fc = nn.BatchNorm2d(widths[3]), nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make_model(name, num_classes, small_images):
    if name in ("resnet18", "resnet50"):
        model = getattr(torchvision.models, name)(num_classes=num_classes)
        if small_images:  # §5.1: 3x3 kernel, stride 1, padding 1 first conv; no max-pool, for 32x32 inputs
            model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        return model
    m = re.fullmatch(r"wrn(\d+)-(\d+)", name)
    if m and small_images and (int(m[1]) - 4) % 6 == 0 and int(m[1]) >= 10:
        return WideResNet(int(m[1]), int(m[2]), num_classes)
    raise SystemExit(
        f"unknown --model {name!r}: choose resnet18, resnet50, or wrn<depth>-<width> with depth = 6n+4 "
        f">= 10 (e.g. wrn28-10, wrn16-1; CIFAR only)"
    )


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def samon(model, base_optimizer, rho=0.05, **kwargs):
    """SAM-ON (Mueller et al., 2023), a baseline: perturb only the trainable parameters of NORM_LAYERS (chosen
    by module type), eps = rho·(g ⊙ m)/||g ⊙ m||: ssam.SSAMF with a fixed whole-tensor mask that is never
    updated."""
    on = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    density = sum(p.numel() for p in trainable if id(p) in on) / sum(p.numel() for p in trainable)
    if not density:
        raise ValueError("the model has no normalization layer with trainable parameters: nothing to perturb")
    opt = ssam.SSAMF(
        model.parameters(),
        base_optimizer,
        rho,
        sparsity=1 - density,
        update_interval=2**62,
        structure="tensor",
        **kwargs,
    )
    opt.set_masks([torch.full_like(p, id(p) in on, dtype=torch.bool) for p in opt.masked])
    return opt
