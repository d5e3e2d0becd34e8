"""What the benchmarks share: the methods (as train.py flags), the models, the timed step (train.py's own),
the FLOP count each method could reach, and the optimizer-state byte count.

The timed step is the trained step: models come from train.make_model (TinyViT, which train.py does not train,
is defined here), optimizers from train.make_optimizer with the method's train.py flags, and every step is
train.train_step. Imported by bench/test_throughput.py, bench/gpu_check.py and tests/test_bench.py.
"""

import contextlib
import math
import os
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

import ssam
import train
from lab import models
from lab.config import resolve_config
from lab.data import augment, load_subset, normalize
from lab.methods import METHODS as TABLE
from lab.methods import SPARSE, flags, key

# The paper's mask-update interval: once an epoch, 50,000 CIFAR images -> 391 steps at batch 128.
CIFAR_TRAIN_IMAGES = 50_000
# The methods timed (lab/methods.py, each entry's `bench`): key -> (train.py flags, weights). "fresh": the
# seed-0 init; "trained": after --bench-train-steps SGD steps on the shipped CIFAR-10 subset (Fisher and |g|
# rankings change with training), key '...@trained'.
METHODS = {
    key(name, sp) + ("@trained" if weights == "trained" else ""): (" ".join(flags(name, sp)), weights)
    for name, m in TABLE.items()
    for sp, weights in m["bench"]
}


def config(flags, num_samples=128):
    """train.py's resolved config for these flags: the cifar10-resnet18 recipe (lr, wd, rho), masks never
    updated by a timed step (update interval 10^9 steps; SSAM-F's first mask is made before timing)."""
    argv = ["--preset", "cifar10-resnet18", *flags.split()]
    opt = argv[argv.index("--optimizer") + 1] if "--optimizer" in argv else "sgd"
    argv += ["--update-interval", str(10**9)] if opt in SPARSE else []  # train.py refuses flags
    argv += ["--num-samples", str(num_samples)] if opt == "ssamf" else []  # an optimizer ignores
    return resolve_config(train.get_args(argv))


def make_optimizer(model, flags, num_samples=128):
    """train.make_optimizer for these train.py flags. Returns (optimizer, config)."""
    cfg = config(flags, num_samples)
    return train.make_optimizer(cfg, model, steps_per_epoch=steps_per_epoch(cfg.batch_size)), cfg


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


NO_AMP = torch.autocast("cpu", enabled=False)


def train_step(model, opt, cfg, x, y):
    """One period of train.py's steps (train.train_step, fp32: cfg.ascent_every of them, 1 for most methods),
    then a device sync so the timer sees the work. A timer divides by cfg.ascent_every: the cost per step
    averaged over whole periods (one ascent step, k-1 without)."""
    for _ in range(cfg.ascent_every):
        train.train_step(
            model,
            opt,
            x,
            y,
            NO_AMP,
            None,
            sync_ascent=cfg.sync_ascent,
            sparse_ascent=cfg.sparse_ascent,
            ascent_fraction=cfg.ascent_fraction,
        )
    sync(x.device)


def ssamd_grads(model, x, y):
    """The gradients SSAM-D's update_mask ranks (one ascent-pass gradient), without touching p.grad."""
    params = list(model.parameters())
    with ssam.frozen_bn_stats(model):
        return list(torch.autograd.grad(F.cross_entropy(model(x), y), params))


# ----------------------------------------------------------------------------------------------------------
# Data: the shipped CIFAR-10 subset (data/cifar10_subset.npz), real images for the masks' rankings


def batch(n, device, start=0):
    """n normalized training images of the subset and their labels, on `device`."""
    x, y = load_subset()[:2]
    return normalize(x[start : start + n]).to(device), y[start : start + n].to(device)


def trained_model(name, width, device, steps, batch_size):
    """The seed-0 init after `steps` SGD steps of train.py (augmented subset batches): a 'trained' state."""
    torch.manual_seed(0)
    model = make_model(name, width).to(device)
    opt, cfg = make_optimizer(model, "--optimizer sgd")
    x_all, y_all = load_subset()[:2]
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(y_all), (batch_size,), generator=g)
        train_step(model, opt, cfg, augment(x_all[idx].to(device), g), y_all[idx].to(device))
    return model


# ----------------------------------------------------------------------------------------------------------
# What a step could cost: multiply-adds counted per layer with hooks (the FLOP column of the report)


def layer_macs(mod, out):
    """Forward multiply-adds of one call of a layer with parameters (the unit of pass_macs)."""
    if isinstance(mod, nn.Linear):
        return out.numel() * mod.in_features
    if isinstance(mod, nn.modules.conv._ConvNd):
        return out.numel() * mod.in_channels // mod.groups * math.prod(mod.kernel_size)
    return out.numel()  # normalization layers and the like: one per output


def pass_macs(model, x):
    """Multiply-adds of one forward/backward of `model` on x with its requires_grad flags as they stand,
    summed over layers with parameters: forward F, input gradient F where the layer's input needs a gradient,
    weight gradient F times the share of the layer's parameters that need one. Parameter-free ops
    (activations, pooling, TinyViT's two attention matmuls, about 4% of its forward) are not counted."""
    total = 0

    def hook(mod, inputs, out):
        nonlocal total
        params = list(mod.parameters(recurse=False))
        share = sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)
        needs_dx = bool(inputs) and torch.is_tensor(inputs[0]) and inputs[0].requires_grad
        total += layer_macs(mod, out) * (1 + needs_dx + share)

    hooks = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if next(m.parameters(recurse=False), None) is not None
    ]
    try:
        with torch.enable_grad(), ssam.frozen_bn_stats(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return total


def flops_x_sgd(model, opt, cfg, x):
    """The method's step in multiply-adds as a multiple of SGD's, the bound its kernels could reach: SGD is
    one full pass; a SAM-type step adds the ascent pass on the first ascent_fraction of x, with the tensors
    opt.ascent_pass() freezes getting no weight gradient and no input gradient below the lowest perturbed
    layer; with --ascent-every k, one step in k (LookSAM's vector operations are not counted)."""
    full = pass_macs(model, x)
    if not isinstance(opt, ssam.SAM):
        return 1.0
    k = max(1, round(cfg.ascent_fraction * len(x)))  # as train.train_step
    with opt.ascent_pass() if hasattr(opt, "ascent_pass") else contextlib.nullcontext():
        ascent = pass_macs(model, x[:k])
    return (ascent / cfg.ascent_every + full) / full


# ----------------------------------------------------------------------------------------------------------
# Models


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)). Every weight matrix is an nn.Linear."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = (
            nn.LayerNorm(width),
            nn.Linear(width, 3 * width),
            nn.Linear(width, width),
        )
        self.ln2, self.fc1, self.fc2 = (
            nn.LayerNorm(width),
            nn.Linear(width, 4 * width),
            nn.Linear(4 * width, width),
        )

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / math.sqrt(C // self.heads)).softmax(
            -1
        )  # plain math: vmap batches it
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, C))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyViT(nn.Module):
    """ViT-style classifier for 32x32 images: 4x4 patches -> Linear, `depth` blocks, mean-pool, Linear head.
    All out dims are multiples of 4 (2:4 masks fit) except the 10-way head, which SSAM masks unstructured."""

    def __init__(self, width=256, depth=4, heads=4, patch=4, num_classes=10, image=32):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(3 * patch * patch, width)
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2, width))
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, num_classes)

    def forward(self, x):
        B, C, H, W = x.shape
        p = self.patch
        x = (
            x.reshape(B, C, H // p, p, W // p, p)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(B, (H // p) * (W // p), C * p * p)
        )
        x = self.blocks(self.embed(x) + self.pos)
        return self.head(self.norm(x).mean(1))


def make_model(name, width=256):
    """'resnet18': train.py's (CIFAR stem, §5.1); 'vit': TinyViT, almost all of its weights in nn.Linear."""
    if name == "resnet18":
        return models.make_model("resnet18", 10, small_images=True)
    if name == "vit":
        return TinyViT(width=width)
    raise ValueError(f"unknown model {name!r}: resnet18 or vit")


# ----------------------------------------------------------------------------------------------------------
# Memory held by an optimizer


def optimizer_state_bytes(opt):
    """Bytes of the tensors an optimizer holds, each storage counted once: 'masks' = SSAM's masks,
    'momentum' = the base optimizer's state (opt.state of a plain optimizer), 'weight_copy' = the copy of w
    that SAM-type optimizers keep between first_step and second_step (opt._w; measure right after
    first_step), 'looksam' = LookSAM's g_v and, during the ascent, its copy of g (opt._g)."""
    seen = set()

    def count(tensors):
        total = 0
        for t in tensors:
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    base = getattr(opt, "base_optimizer", None)
    ours = list(opt.state.values()) if base is not None else []
    out = dict(masks=count(s["mask"] for s in ours if "mask" in s))
    out["momentum"] = count(v for s in (base or opt).state.values() for v in s.values())
    w, g = getattr(opt, "_w", None), getattr(opt, "_g", None)
    out["weight_copy"] = count(w[1]) if w is not None else 0
    out["looksam"] = count(s["g_v"] for s in ours if "g_v" in s) + (count(g[1]) if g is not None else 0)
    out["total"] = out["masks"] + out["momentum"] + out["weight_copy"] + out["looksam"]
    return out


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# The machine, for every table we write


def machine():
    cpu = platform.processor() or "unknown CPU"
    try:
        info = open("/proc/cpuinfo").read().splitlines()

        def field(key):
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith(key)), None)

        cpu = field("model name") or cpu
        if field("cpu family"):
            cpu += f" (family {field('cpu family')}, model {field('model')})"
    except OSError:
        pass
    out = dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads())
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        out["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    return out


def steps_per_epoch(batch):
    """The paper's mask-update interval in steps: one epoch of CIFAR at this batch size (391 at 128)."""
    return math.ceil(CIFAR_TRAIN_IMAGES / batch)
