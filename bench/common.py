"""What the benchmarks share: the two models, the optimizers by name, one training step, the batch-1 Fisher
loop that ssam.empirical_fisher is measured against, and the optimizer-state byte count.

Imported by bench/test_throughput.py, bench/gpu_check.py and tests/test_bench.py (repo root on sys.path).
"""
import contextlib
import math
import os
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import ssam

# The paper's mask-update interval: once an epoch, 50,000 CIFAR images -> 391 steps at batch 128.
CIFAR_TRAIN_IMAGES = 50_000
# The paper's theoretical cost of one step relative to SGD (Tables 1-3, FLOPs column), by sparsity; SAM = 0.
PAPER_FLOPS = {0.0: 2.0, 0.5: 1.65, 0.8: 1.44, 0.9: 1.36, 0.95: 1.33, 0.98: 1.31, 0.99: 1.30}

# The methods timed, one benchmark each: (optimizer, sparsity, structure, sparse_ascent around the 1st pass).
METHODS = [
    ("sgd", 0.0, None, False),
    ("sam", 0.0, None, False),
    ("ssamf", 0.5, None, False),
    ("ssamf", 0.9, None, False),
    ("ssamd", 0.5, None, False),
    ("ssamd", 0.9, None, False),
    ("ssamf", 0.5, "2:4", False),
    ("ssamd", 0.5, "2:4", False),
    ("ssamf", 0.5, "2:4", True),     # 2:4 sparse backward: dX = dY (W ⊙ M) in the ascent pass of nn.Linear
    ("ssamd", 0.5, "2:4", True),
    ("ssamf", 0.5, "tensor", False),  # whole-tensor masks: no ascent weight gradient for unperturbed tensors
    ("ssamf", 0.9, "tensor", False),
    ("ssamf", 0.99, "tensor", False),
    ("ssamd", 0.9, "tensor", False),
    ("samon", 0.0, None, False),      # SAM-ON: only normalization layers perturbed
]


def method_name(opt, sparsity, structure, sparse_ascent):
    name = opt if opt in ("sgd", "sam", "samon") else f"{opt}-s{sparsity:g}"
    return name + (f"-{structure}" if structure else "") + ("-sparse_ascent" if sparse_ascent else "")


# ----------------------------------------------------------------------------------------------------------
# Models

def resnet18_cifar(num_classes=10):
    """torchvision ResNet-18 with the CIFAR stem (§5.1): 3x3 stride-1 first conv, no max-pool."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)). Every weight matrix is an nn.Linear."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / math.sqrt(C // self.heads)).softmax(-1)   # plain math: vmap batches it
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
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)
        x = self.blocks(self.embed(x) + self.pos)
        return self.head(self.norm(x).mean(1))


def make_model(name, width=256):
    if name == "resnet18":
        return resnet18_cifar()
    if name == "vit":
        return TinyViT(width=width)
    raise ValueError(f"unknown model {name!r}: resnet18 or vit")


# ----------------------------------------------------------------------------------------------------------
# Optimizers and one training step

def make_optimizer(model, opt, sparsity=0.0, structure=None, update_interval=10**9, total_steps=10**9, rho=0.1,
                   num_samples=128):
    """SGD (momentum 0.9, wd 5e-4, as §5.1) or SAM / SSAM-F / SSAM-D around it. The default update_interval is
    so large that no timed step updates the mask (SSAM-D draws its first mask here; SSAM-F needs update_mask)."""
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    if opt == "sgd":
        return torch.optim.SGD(model.parameters(), **sgd)
    if opt == "sam":
        return ssam.SAM(model.parameters(), torch.optim.SGD, rho=rho, **sgd)
    if opt == "samon":
        return ssam.SAMON(model, torch.optim.SGD, rho=rho, **sgd)
    if opt == "ssamf":
        return ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=rho, sparsity=sparsity, structure=structure,
                          update_interval=update_interval, num_samples=num_samples, **sgd)
    if opt == "ssamd":
        return ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=rho, sparsity=sparsity, structure=structure,
                          update_interval=update_interval, total_steps=total_steps, seed=0, **sgd)
    raise ValueError(f"unknown optimizer {opt!r}")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train_step(model, opt, x, y, sparse_ascent=False):
    """One full step, as train.py does it: SGD = 1 forward/backward; SAM-type = ascent pass, w + eps, descent
    pass with BatchNorm statistics frozen, back to w, SGD step."""
    if not isinstance(opt, ssam.SAM):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(x.device)
        return
    with ssam.sparse_ascent(model, opt) if sparse_ascent else contextlib.nullcontext(), opt.ascent_pass() \
            if hasattr(opt, "ascent_pass") else contextlib.nullcontext():   # structure='tensor': fewer gradients
        F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with ssam.frozen_bn_stats(model):
        F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    sync(x.device)


def ssamd_grads(model, x, y):
    """The gradients SSAM-D's update_mask ranks (one ascent-pass gradient), without touching p.grad."""
    params = list(model.parameters())
    with ssam.frozen_bn_stats(model):
        return list(torch.autograd.grad(F.cross_entropy(model(x), y), params))


# ----------------------------------------------------------------------------------------------------------
# SSAM-F's Fisher the slow way: one sample at a time (what ssam.empirical_fisher replaces with vmap)

def fisher_loop(model, data, num_samples, loss_fn=F.cross_entropy):
    """Sum over `num_samples` samples of the squared gradient of each sample's loss (Eq. 5), one backward per
    sample. In train mode BatchNorm normalizes each sample by its own statistics and running stats are left
    alone (frozen_bn_stats), as in ssam.empirical_fisher. Returns {parameter: tensor}; p.grad is not touched."""
    params = list(model.parameters())
    fisher = [torch.zeros_like(p) for p in params]
    seen = 0
    with ssam.frozen_bn_stats(model):
        for x, y in data:
            for i in range(min(len(x), num_samples - seen)):
                g = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), params)
                torch._foreach_addcmul_(fisher, g, g)
                seen += 1
            if seen >= num_samples:
                break
    if seen < num_samples:
        raise ValueError(f"data gave {seen} samples but num_samples={num_samples}")
    return dict(zip(params, fisher))


# ----------------------------------------------------------------------------------------------------------
# Memory held by an optimizer

def optimizer_state_bytes(opt):
    """Bytes of the tensors an optimizer holds, each storage counted once: 'masks' = SSAM's opt.state,
    'momentum' = the base optimizer's state (opt.state of a plain optimizer), 'weight_copy' = the copy of w
    that SAM-type optimizers keep between first_step and second_step (opt._w; measure right after first_step)."""
    seen = set()

    def count(tensors):
        total = 0
        for t in tensors:
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    base = getattr(opt, "base_optimizer", None)
    out = dict(masks=count(v for s in opt.state.values() for v in s.values()) if base is not None else 0)
    out["momentum"] = count(v for s in (base or opt).state.values() for v in s.values())
    w = getattr(opt, "_w", None)
    out["weight_copy"] = count(w[1]) if w is not None else 0
    out["total"] = out["masks"] + out["momentum"] + out["weight_copy"]
    return out


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# The machine, for every table we write

def machine():
    cpu = platform.processor() or "unknown CPU"
    try:
        info = open("/proc/cpuinfo").read().splitlines()
        field = lambda k: next((l.split(":", 1)[1].strip() for l in info if l.startswith(k)), None)
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
