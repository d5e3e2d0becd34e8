"""Train SGD, SAM, SSAM-F or SSAM-D on CIFAR-10/100 or ImageNet-1K (Mi et al., NeurIPS 2022, Tables 1-3).

One device (CUDA if present, else CPU):
    python train.py                                                   # wrn10-1 on the 5,000-image subset in data/
    python train.py --demo                                            # SGD, SAM, SSAM-F, SSAM-D side by side (make demo)
    python train.py --preset cifar10-resnet18 --optimizer ssamf --sparsity 0.5
    python train.py --preset cifar100-wrn28-10 --optimizer ssamd --sparsity 0.9 --data-dir data/cifar100
    python train.py --preset cifar10-resnet18 --data-dir /tmp/cifar10     # ImageFolder tree <dir>/{train,test}/<class>/*.jpg
    python train.py --preset cifar10-resnet18 --optimizer sam --resume    # continue runs/<name> from its checkpoint
One node, 8 GPUs (--batch-size is the global batch, split over the processes):
    torchrun --standalone --nproc_per_node 8 train.py --preset imagenet-resnet50 --optimizer ssamd --data-dir /data/imagenet
Two nodes, 8 GPUs each (run on both; the first node's address in --master_addr):
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29500 train.py --preset imagenet-resnet50
    torchrun --nnodes 2 --node_rank 1 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29500 train.py --preset imagenet-resnet50
CPU processes (gloo) work the same way: torchrun --standalone --nproc_per_node 2 train.py --device cpu

Every preset value can be overridden by its flag (python train.py --help). The resolved config is printed
at the start. Output goes to --out-dir (default runs/<name>): metrics.jsonl (one line an epoch),
ckpt.pt (written atomically every epoch) and final.json.
"""
import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import ssam

ROOT = Path(__file__).resolve().parent
console = Console(stderr=True)

# -----------------------------------------------------------------------------------------------------------
# Presets: the paper's recipes (§5.1). Weight decay differs by optimizer: SAM/SSAM use 1e-3 on CIFAR [14].
# -----------------------------------------------------------------------------------------------------------
PRESET_KEYS = ("dataset", "model", "epochs", "batch_size", "lr", "wd_sgd", "wd_sam", "rho")
PRESETS = {
    # name                dataset           model       epochs batch  lr    wd SGD  wd SAM  rho
    "cifar10-subset":    ("cifar10-subset", "wrn10-1",  6,     64,    0.05, 5e-4,   1e-3,   0.1),   # demo (see below)
    "cifar10-resnet18":  ("cifar10",        "resnet18", 200,   128,   0.05, 5e-4,   1e-3,   0.1),   # Table 1
    "cifar100-resnet18": ("cifar100",       "resnet18", 200,   128,   0.05, 5e-4,   1e-3,   0.2),   # Table 1
    "cifar10-wrn28-10":  ("cifar10",        "wrn28-10", 200,   128,   0.05, 5e-4,   1e-3,   0.1),   # Table 2
    "cifar100-wrn28-10": ("cifar100",       "wrn28-10", 200,   128,   0.05, 5e-4,   1e-3,   0.2),   # Table 2
    "imagenet-resnet50": ("imagenet",       "resnet50", 90,    256,   0.1,  1e-4,   1e-4,   0.07),  # Table 3
}
# Why the demo preset is what it is (2-core CPU, SGD): wrn10-1 ran an epoch of the subset in 3.9 s at batch 64 and
# 4.9 s at batch 128, and reached 42.8% / 37.6% test accuracy after 5 epochs; wrn16-1 reached 34% in 3 epochs of
# about the same time. 6 epochs keep all four optimizers of --demo under 5 minutes (SAM-type steps cost 2 passes):
# `make demo` took 370 s with 8 epochs on an idle box (SGD 79, SAM 148, SSAM-F 155, SSAM-D 148 ms/step).
# Shared by every preset (§5.1): SGD momentum 0.9, cosine LR, crop+flip (+Cutout 16x16 on CIFAR).
MOMENTUM = 0.9
CIFAR_MEAN, CIFAR_STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)     # per channel, 0..255 pixel units
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Keys that may change between a run and its --resume without changing what is trained.
RESUME_FREE = {"resume", "fresh", "out_dir", "name", "data_dir", "workers", "device", "compile", "eval_every"}


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--preset", default="cifar10-subset", help=f"recipe to start from: {', '.join(PRESETS)} (default: %(default)s)")
    a("--demo", action="store_true", help="train SGD, SAM, SSAM-F, SSAM-D on the preset and print a comparison table")
    g = ap.add_argument_group("recipe (default: the preset's value)")
    g.add_argument("--dataset", help="cifar10-subset | cifar10 | cifar100 | imagenet")
    g.add_argument("--data-dir", help="CIFAR: ImageFolder tree <dir>/{train,test}/<class>/*.jpg, or torchvision's "
                   "download folder (default data/<dataset>); ImageNet: <dir>/{train,val}/<class>/*")
    g.add_argument("--model", help="resnet18 | resnet50 | wrn<depth>-<width>, e.g. wrn28-10, wrn16-1")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch, split over torchrun's processes")
    g.add_argument("--lr", type=float, help="peak learning rate; cosine decay to 0 over all steps")
    g.add_argument("--weight-decay", type=float, help="default: the preset's wd for SGD, or for SAM/SSAM")
    g.add_argument("--rho", type=float, help="SAM/SSAM perturbation radius")
    g.add_argument("--cutout", type=int, default=16, help="Cutout square side on CIFAR, applied with p=0.5; 0 = off "
                   "(default: %(default)s)")
    g.add_argument("--train-size", type=int, default=0, help="train on a fixed random N-image part (0 = all; tests)")
    g.add_argument("--seed", type=int, default=0, help="model init, data order, augmentation, SSAM-D growth")
    g.add_argument("--label-noise", type=float, default=0.0, help="CIFAR: give this fraction of the training images a "
                   "wrong label, drawn once with a fixed seed (the same for every --seed) (default: %(default)s)")
    g.add_argument("--eval-every", type=int, help="test accuracy every N epochs and after the last (default: 1; "
                   "--demo: only after the last)")
    g = ap.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="sgd", help="sgd | sam | ssamf | ssamd | samon (SAM on normalization layers only) "
                   "(default: %(default)s)")
    g.add_argument("--sparsity", type=float, default=0.5, help="SSAM: fraction of weights NOT perturbed; the paper "
                   "uses 0.5, 0.8, 0.9, 0.95, 0.98, 0.99 (default: %(default)s)")
    g.add_argument("--structure", default="unstructured", help="SSAM mask: unstructured | 2:4 (needs sparsity "
                   "0.5) | tensor (whole tensors; skips their ascent weight gradient) (default: %(default)s)")
    g.add_argument("--update-interval", type=int, default=0, help="steps between SSAM mask updates; 0 = once an "
                   "epoch, as in the authors' code (default: %(default)s)")
    g.add_argument("--num-samples", type=int, default=128, help="SSAM-F: training images for the Fisher estimate "
                   "(N_F, Eq. 5) (default: %(default)s)")
    g.add_argument("--drop-rate", type=float, default=0.5, help="SSAM-D: fraction of the mask dropped and regrown "
                   "at each update (alpha, Eq. 9; cosine-decayed) (default: %(default)s)")
    g.add_argument("--adaptive", action="store_true", help="SAM: adaptive (ASAM) perturbation")
    g.add_argument("--sync-ascent", action="store_true", help="DDP: all-reduce the ascent (first) gradient too; "
                   "default off = each process perturbs with its own batch's gradient, as in the SAM paper")
    g = ap.add_argument_group("system")
    g.add_argument("--device", help="cuda | cpu | cuda:N (default: cuda if available)")
    g.add_argument("--amp", default="none", help="none | bf16 | fp16 (fp16: CUDA only, with a GradScaler)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format (CUDA only)")
    g.add_argument("--workers", type=int, default=8, help="ImageNet DataLoader workers (default: %(default)s)")
    g.add_argument("--name", help="run name (default: <preset>-<optimizer>[-s<sparsity>]-seed<seed>)")
    g.add_argument("--out-dir", help="default runs/<name>")
    g.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    g.add_argument("--fresh", action="store_true", help="start over even if <out-dir> holds a checkpoint")
    args = ap.parse_args(argv)
    if args.preset not in PRESETS:
        raise SystemExit(f"unknown --preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    return args


def resolve_config(args):
    """Preset values, overridden by every flag that was given. Returns a plain dict."""
    cfg = dict(zip(PRESET_KEYS, PRESETS[args.preset]))
    for k, v in vars(args).items():
        if v is not None and k not in ("weight_decay", "demo"):
            cfg[k] = v
    cfg["optimizer"] = cfg["optimizer"].lower()
    if cfg["optimizer"] not in ("sgd", "sam", "ssamf", "ssamd", "samon"):
        raise SystemExit(f"unknown --optimizer {cfg['optimizer']!r}: choose sgd, sam, ssamf, ssamd or samon")
    if cfg["structure"] not in ("unstructured", "2:4", "tensor"):
        raise SystemExit(f"unknown --structure {cfg['structure']!r}: choose unstructured, 2:4 or tensor")
    if cfg["structure"] == "2:4" and cfg["sparsity"] != 0.5 and cfg["optimizer"] in ("ssamf", "ssamd"):
        raise SystemExit(f"--structure 2:4 perturbs 2 of every 4 weights: it needs --sparsity 0.5, not {cfg['sparsity']}")
    if cfg["dataset"] not in ("cifar10-subset", "cifar10", "cifar100", "imagenet"):
        raise SystemExit(f"unknown --dataset {cfg['dataset']!r}: choose cifar10-subset, cifar10, cifar100 or imagenet")
    if cfg["amp"] not in ("none", "bf16", "fp16"):
        raise SystemExit(f"unknown --amp {cfg['amp']!r}: choose none, bf16 or fp16")
    wd_sgd, wd_sam = cfg.pop("wd_sgd"), cfg.pop("wd_sam")
    wd = wd_sgd if cfg["optimizer"] == "sgd" else wd_sam
    cfg["weight_decay"] = args.weight_decay if args.weight_decay is not None else wd
    if cfg["optimizer"] in ("sgd", "sam", "samon"):  # these knobs mean nothing there; keep them out of names and checks
        for k in ("sparsity", "structure", "update_interval", "num_samples", "drop_rate"):
            cfg.pop(k)
    if cfg["optimizer"] == "sgd":
        cfg.pop("rho"), cfg.pop("adaptive"), cfg.pop("sync_ascent")
    if not cfg.get("name"):
        sp = f"-s{cfg['sparsity']:g}" if "sparsity" in cfg else ""
        sp += f"-{cfg['structure'].replace(':', 'of')}" if cfg.get("structure", "unstructured") != "unstructured" else ""
        cfg["name"] = f"{args.preset}-{cfg['optimizer']}{sp}-seed{cfg['seed']}"
    cfg["out_dir"] = cfg.get("out_dir") or str(ROOT / "runs" / cfg["name"])
    return cfg


# -----------------------------------------------------------------------------------------------------------
# Data: CIFAR lives on the training device as one uint8 tensor; whole batches are augmented there.
# -----------------------------------------------------------------------------------------------------------
def decode_jpegs(blobs):
    """list of JPEG files (bytes) -> (N, 3, H, W) uint8, decoded with Pillow (as torchvision's ImageFolder)."""
    return torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
                            ).permute(0, 3, 1, 2).contiguous()


@functools.lru_cache(maxsize=1)  # decoded once per process (the demo trains four times)
def load_subset():
    path = ROOT / "data" / "cifar10_subset.npz"
    if not path.exists():
        raise SystemExit(f"{path} is missing: it ships with the repo; remake it with "
                         "`python scripts/make_subset.py /path/to/cifar10-jpeg.tar.gz`")
    z = np.load(path)
    out = []
    for split in ("train", "test"):
        buf, off = z[f"{split}_jpeg"].tobytes(), z[f"{split}_offsets"]
        x = decode_jpegs([buf[off[i]:off[i + 1]] for i in range(len(off) - 1)])
        out += [x, torch.from_numpy(z[f"{split}_labels"].astype(np.int64))]
    return out


def load_image_folder_tensor(root):
    """<root>/{train,test}/<class>/*.jpg -> uint8 tensors, decoded once and cached in data/cache/."""
    root = Path(root).resolve()
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    files = {s: sorted((root / s).glob("*/*")) for s in ("train", "test")}
    key = f"{root}|{classes}|{len(files['train'])}|{len(files['test'])}"
    cache = ROOT / "data" / "cache" / f"{root.name}-{hash_str(key):016x}.pt"
    if cache.exists():
        return torch.load(cache)
    out = []
    with console.status(f"decoding {len(files['train']) + len(files['test'])} images from {root} (once; cached "
                        f"in {cache})"):
        for s in ("train", "test"):
            bad = [f for f in files[s] if f.parent.name not in classes]
            if bad:
                raise SystemExit(f"{bad[0]}: class folder {bad[0].parent.name!r} is in {s}/ but not in train/")
            x = decode_jpegs([f.read_bytes() for f in files[s]])
            y = torch.tensor([classes.index(f.parent.name) for f in files[s]])
            out += [x, y]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(out, tmp)
    os.replace(tmp, cache)
    return out


def hash_str(s):  # stable across processes (python's hash() is salted)
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")


def load_cifar(cfg):
    """-> train_x, train_y, test_x, test_y: uint8 (N, 3, 32, 32) and int64 (N,), on the CPU."""
    name = cfg["dataset"]
    if name == "cifar10-subset":
        return load_subset()
    root = Path(cfg.get("data_dir") or ROOT / "data" / name)
    if (root / "train").is_dir() or (root / "test").is_dir():
        for s in ("train", "test"):
            if not (root / s).is_dir() or not any(d.is_dir() for d in (root / s).iterdir()):
                raise SystemExit(f"{root}: expected an ImageFolder tree {root}/{{train,test}}/<class>/*.jpg, but "
                                 f"{root / s} is missing or has no class folders")
        return load_image_folder_tensor(root)
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    if root.exists() and any(root.iterdir()) and not any(root.glob("cifar-*-python*")):
        raise SystemExit(f"{root} holds neither an ImageFolder tree ({root}/train/<class>/*.jpg and {root}/test/...) "
                         f"nor torchvision's {name} files (cifar-*-python): point --data-dir at one of those")
    out = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=True)
        except Exception as e:  # offline, disk full, corrupt download: say what to do instead
            raise SystemExit(f"could not load or download {name} into {root} ({type(e).__name__}: {e}). Offline? "
                             f"Put torchvision's {name} files there, or pass --data-dir with an ImageFolder tree "
                             f"<dir>/{{train,test}}/<class>/*.jpg, or use --dataset cifar10-subset") from None
        out += [torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)]
    return out


def augment(x, g, cutout=16, pad=4):
    """Random crop (zero padding `pad`), horizontal flip, normalization, Cutout (p=0.5) on a whole uint8 batch.
    All random numbers come from the CPU generator `g`, so the result is the same on any device and a resumed
    run draws exactly what the straight run drew."""
    B, C, H, W = x.shape
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B), generator=g)
    flip = torch.rand(B, generator=g) < 0.5
    cut = torch.rand(B, generator=g) < 0.5
    cy, cx = torch.randint(0, H, (B,), generator=g), torch.randint(0, W, (B,), generator=g)
    dy, dx, flip, cut, cy, cx = (t.to(x.device, non_blocking=True) for t in (dy, dx, flip, cut, cy, cx))
    rows = dy[:, None] + torch.arange(H, device=x.device)                  # (B, H) rows of the padded image
    cols = dx[:, None] + torch.arange(W, device=x.device)                  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)                  # a flip reads the columns backwards
    xp = F.pad(x, (pad, pad, pad, pad))
    x = xp[torch.arange(B, device=x.device)[:, None, None, None], torch.arange(C, device=x.device)[None, :, None, None],
           rows[:, None, :, None], cols[:, None, None, :]]
    x = normalize(x)
    if cutout > 0:  # Cutout [DeVries & Taylor]: zero (= the mean, after normalization) a square around a random center
        r, c = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
        in_r = (r[None] >= cy[:, None] - cutout // 2) & (r[None] < cy[:, None] + cutout - cutout // 2)
        in_c = (c[None] >= cx[:, None] - cutout // 2) & (c[None] < cx[:, None] + cutout - cutout // 2)
        hole = cut[:, None, None] & in_r[:, :, None] & in_c[:, None, :]
        x = x.masked_fill(hole[:, None], 0.0)
    return x


def normalize(x):
    mean = torch.tensor(CIFAR_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() - mean) / std


def noisy_labels(y, p, num_classes):
    """A fixed fraction p of the labels replaced by a different class, uniformly; drawn from seed 0 (not --seed),
    so every run of a comparison sees the same noisy training set."""
    if not 0 <= p < 1:
        raise SystemExit(f"--label-noise {p} must be in [0, 1)")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(y), generator=g)[:round(p * len(y))]
    y = y.clone()
    y[idx] = (y[idx] + torch.randint(1, num_classes, (len(idx),), generator=g)) % num_classes
    return y


class CifarOnDevice:
    """Train/test tensors on the device; batches(g) yields this process's share of each global batch."""

    def __init__(self, cfg, device, rank, world):
        train_x, train_y, test_x, test_y = load_cifar(cfg)
        if cfg["train_size"]:
            keep = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))[:cfg["train_size"]]
            train_x, train_y = train_x[keep.sort().values], train_y[keep.sort().values]
        self.num_classes = 100 if cfg["dataset"] == "cifar100" else 10
        if cfg.get("label_noise"):  # symmetric noise: exactly round(p*N) images get one of the other labels
            train_y = noisy_labels(train_y, cfg["label_noise"], self.num_classes)
        self.train_x, self.train_y = train_x.to(device), train_y.to(device)
        self.test_x, self.test_y = test_x[rank::world].to(device), test_y[rank::world].to(device)
        self.batch, self.cutout, self.rank, self.world = cfg["batch_size"], cfg["cutout"], rank, world
        self.steps_per_epoch = len(self.train_y) // self.batch               # the last partial batch is dropped
        if self.steps_per_epoch == 0:
            raise SystemExit(f"--batch-size {self.batch} is larger than the {len(self.train_y)} training images")

    def batches(self, g):
        """Same draws from g on every process (the global batch is drawn, then split), so g's state is one."""
        perm = torch.randperm(len(self.train_y), generator=g)
        for i in range(self.steps_per_epoch):
            idx = perm[i * self.batch:(i + 1) * self.batch].to(self.train_y.device)
            x = augment(self.train_x[idx], g, self.cutout)
            yield x[self.rank::self.world], self.train_y[idx][self.rank::self.world]

    def fisher_batches(self, g, n):
        """n random augmented training images for SSAM-F's Fisher estimate (not split: each process uses all n)."""
        idx = torch.randperm(len(self.train_y), generator=g)[:n].to(self.train_y.device)
        x, y = augment(self.train_x[idx], g, self.cutout), self.train_y[idx]
        return [(x[i:i + self.batch], y[i:i + self.batch]) for i in range(0, n, self.batch)]

    def test_batches(self):
        for i in range(0, len(self.test_y), 1000):
            yield normalize(self.test_x[i:i + 1000]), self.test_y[i:i + 1000]


class ImageNetLoader:
    """ImageNet from an ImageFolder tree with DataLoader workers (too big to sit on the device)."""

    def __init__(self, cfg, device, rank, world):
        T = torchvision.transforms
        root = Path(cfg.get("data_dir") or ROOT / "data" / "imagenet")
        for s in ("train", "val"):
            if not (root / s).is_dir():
                raise SystemExit(f"ImageNet: {root / s} not found; --data-dir must hold train/<wnid>/*.JPEG and "
                                 f"val/<wnid>/*.JPEG (val sorted into class folders)")
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        test_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
        self.train_ds = torchvision.datasets.ImageFolder(str(root / "train"), self.train_tf)
        test_ds = torchvision.datasets.ImageFolder(str(root / "val"), test_tf)
        if test_ds.classes != self.train_ds.classes:
            raise SystemExit(f"ImageNet: {root}/val has different class folders than {root}/train")
        self.num_classes = len(self.train_ds.classes)
        self.local_batch, self.device, self.workers = cfg["batch_size"] // world, device, cfg["workers"]
        # DistributedSampler with world=1 too: the order depends only on (seed, epoch), so resume gets it right.
        self.sampler = torch.utils.data.DistributedSampler(self.train_ds, world, rank, seed=cfg["seed"], drop_last=True)
        self.loader = torch.utils.data.DataLoader(self.train_ds, self.local_batch, sampler=self.sampler,
                                                  num_workers=self.workers, pin_memory=True, drop_last=True,
                                                  persistent_workers=self.workers > 0)
        self.test_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test_ds, range(rank, len(test_ds), world)),
                                                       250, num_workers=self.workers, pin_memory=True)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise SystemExit(f"--batch-size {cfg['batch_size']} is larger than the {len(self.train_ds)} training images")
        self.epoch = 0

    def batches(self, g):  # augmentation runs in the workers; g only picks SSAM-F's Fisher images
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def fisher_batches(self, g, n):
        idx = torch.randperm(len(self.train_ds), generator=g)[:n].tolist()
        dl = torch.utils.data.DataLoader(torch.utils.data.Subset(self.train_ds, idx), self.local_batch,
                                         num_workers=min(self.workers, 4))
        return [(x.to(self.device), y.to(self.device)) for x, y in dl]

    def test_batches(self):
        for x, y in self.test_loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# -----------------------------------------------------------------------------------------------------------
# Models: torchvision ResNets (CIFAR stem: 3x3 stride-1 conv, no max-pool, §5.1) and WideResNet.
# -----------------------------------------------------------------------------------------------------------
class WideBlock(nn.Module):
    """Pre-activation basic block of WideResNet (Zagoruyko & Komodakis 2016), no dropout."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

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
        self.blocks = nn.Sequential(*[WideBlock(widths[s] if i == 0 else widths[s + 1], widths[s + 1],
                                                (1 if s == 0 else 2) if i == 0 else 1)
                                      for s in range(3) for i in range(n)])
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
    raise SystemExit(f"unknown --model {name!r}: choose resnet18, resnet50, or wrn<depth>-<width> with depth = 6n+4 "
                     f">= 10 (e.g. wrn28-10, wrn16-1; CIFAR only)")


def make_optimizer(cfg, model, steps_per_epoch):
    sgd = dict(lr=cfg["lr"], momentum=MOMENTUM, weight_decay=cfg["weight_decay"])
    o = cfg["optimizer"]
    if o == "sgd":
        return torch.optim.SGD(model.parameters(), **sgd)
    if o == "sam":
        return ssam.SAM(model.parameters(), torch.optim.SGD, rho=cfg["rho"], adaptive=cfg["adaptive"], **sgd)
    if o == "samon":
        return ssam.SAMON(model, torch.optim.SGD, rho=cfg["rho"], **sgd)
    structure = None if cfg["structure"] == "unstructured" else cfg["structure"]
    interval = cfg["update_interval"] or steps_per_epoch
    if o == "ssamf":
        return ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=cfg["rho"], sparsity=cfg["sparsity"],
                          num_samples=cfg["num_samples"], update_interval=interval, structure=structure, **sgd)
    return ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=cfg["rho"], sparsity=cfg["sparsity"],
                      drop_rate=cfg["drop_rate"], update_interval=interval, structure=structure,
                      total_steps=cfg["epochs"] * steps_per_epoch, seed=cfg["seed"], **sgd)


# -----------------------------------------------------------------------------------------------------------
# One training step. SAM-type: ascent pass, w + e, descent pass with BN statistics frozen, restore, SGD step.
# -----------------------------------------------------------------------------------------------------------
def train_step(model, opt, x, y, autocast, scaler=None, sync_ascent=False):
    """Returns (loss, logits) of the unperturbed pass. `model` may be DDP-wrapped: the ascent pass then runs
    under no_sync() (no all-reduce) unless sync_ascent; the descent pass all-reduces as usual.

    fp16 (scaler given): the ascent gradient stays scaled, since eps = rho * g / ||g|| (and SSAM-D's ranking by
    |g|) do not depend on the scale; if it overflowed, ssam.py makes eps = 0. The descent gradient is unscaled
    by the scaler; if it holds inf/NaN, the step is skipped: second_step still restores w exactly, but with all
    gradients set to None, SGD leaves every parameter alone (no decay, no momentum). DDP all-reduced that
    gradient, so every process skips together. Then the scaler lowers its scale."""
    if not isinstance(opt, ssam.SAM):
        with autocast:
            out = model(x)
            loss = F.cross_entropy(out, y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), out.detach()
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    ascent = opt.ascent_pass() if hasattr(opt, "ascent_pass") else contextlib.nullcontext()   # structure=tensor
    with model.no_sync() if ddp and not sync_ascent else contextlib.nullcontext(), ascent:
        with autocast:
            out = model(x)
            loss = F.cross_entropy(out, y)
        (loss if scaler is None else scaler.scale(loss)).backward()
    opt.first_step(zero_grad=True)                     # w <- w + eps (SSAM-D may draw a new mask in here)
    try:
        with ssam.frozen_bn_stats(model):              # BN running statistics follow the first pass only
            with autocast:
                loss2 = F.cross_entropy(model(x), y)
            (loss2 if scaler is None else scaler.scale(loss2)).backward()
    except BaseException:                              # Ctrl-C, OOM...: never leave (or checkpoint) w + eps
        opt.restore()
        raise
    if scaler is not None:
        scaler.unscale_(opt.base_optimizer)
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not torch.isfinite(torch.stack([gr.norm() for gr in grads]).sum()):
            opt.zero_grad(set_to_none=True)            # skipped step: second_step below only restores w
    opt.second_step(zero_grad=True)                    # w back exactly, then SGD with the gradient at w + eps
    if scaler is not None:
        scaler.update()
    return loss.detach(), out.detach()


def broadcast_masks(opt):
    """Make every process's SSAM masks rank 0's. bool tensors travel as one flat uint8 tensor (gloo has no bool)."""
    masks = [opt.state[p]["mask"] for g in opt.param_groups for p in g["params"] if "mask" in opt.state.get(p, {})]
    if not masks:
        return
    flat = torch.cat([m.flatten() for m in masks]).to(torch.uint8)
    dist.broadcast(flat, 0)
    for m, chunk in zip(masks, flat.split([m.numel() for m in masks])):
        m.copy_(chunk.view_as(m).bool())


def fingerprint(model, opt):
    """Per-tensor float64 sums of parameters and masks: equal across processes iff they are in sync. (BN running
    statistics are left out: DDP copies rank 0's to every process at the start of each forward.)"""
    ts = list(model.parameters())
    ts += [s["mask"] for s in opt.state.values() if "mask" in s]
    return torch.stack([t.detach().double().sum() for t in ts] + [t.detach().double().abs().sum() for t in ts])


# -----------------------------------------------------------------------------------------------------------
# Checkpoints: written atomically every epoch; --resume restores everything, so the run continues bit-exactly.
# -----------------------------------------------------------------------------------------------------------
def save_checkpoint(path, **state):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves either the old checkpoint or the new one, never half of one


def load_checkpoint(path, cfg):
    if not path.exists():
        raise SystemExit(f"--resume: no checkpoint at {path}; drop --resume to start from scratch")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)  # our own file: it holds generator states
        saved = ck["config"]
    except Exception as e:
        raise SystemExit(f"--resume: {path} is unreadable or not a train.py checkpoint ({type(e).__name__}: {e}). "
                         f"Delete it (or the run folder) to start over, or pass --fresh") from None
    diff = sorted(k for k in set(saved) | set(cfg) if k not in RESUME_FREE and saved.get(k) != cfg.get(k))
    if diff:
        raise SystemExit(f"--resume: {path} was made with a different config: " +
                         ", ".join(f"{k}={saved.get(k)!r} (now {cfg.get(k)!r})" for k in diff) +
                         ". Use the same flags, another --out-dir, or --fresh to start over")
    return ck


# -----------------------------------------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------------------------------------
def setup_distributed(cfg):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    if "RANK" not in os.environ:
        dev = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(dev), 0, 1
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = (cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cfg["batch_size"] % world:
        raise SystemExit(f"--batch-size {cfg['batch_size']} must be divisible by the {world} processes")
    return torch.device(f"cuda:{local}" if cuda else "cpu"), rank, world


def check_system_flags(cfg, device):
    if device.type != "cuda":
        for flag, on in (("--amp fp16", cfg["amp"] == "fp16"), ("--compile", cfg["compile"]),
                         ("--channels-last", cfg["channels_last"])):
            if on:
                raise SystemExit(f"{flag} is for CUDA only (device is {device}); on a CPU use --amp bf16 or none")


def train(cfg, show_config=True):
    """Train one run described by cfg (see resolve_config); returns the final metrics dict (rank 0)."""
    device, rank, world = setup_distributed(cfg)
    master = rank == 0
    check_system_flags(cfg, device)
    out_dir, ckpt_path = Path(cfg["out_dir"]), Path(cfg["out_dir"]) / "ckpt.pt"
    if master and show_config:
        table = Table("key", "value", title=f"config ({world} process{'es' if world > 1 else ''} on {device})")
        for k, v in cfg.items():
            table.add_row(k, str(v))
        console.print(table)
    if ckpt_path.exists() and not cfg["resume"] and not cfg["fresh"]:
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue that run, or --fresh to start over")
    torch.manual_seed(cfg["seed"])

    # data, model, optimizer, schedule
    imagenet = cfg["dataset"] == "imagenet"
    data = (ImageNetLoader if imagenet else CifarOnDevice)(cfg, device, rank, world)
    steps_per_epoch, total_steps = data.steps_per_epoch, cfg["epochs"] * data.steps_per_epoch
    raw_model = make_model(cfg["model"], data.num_classes, small_images=not imagenet).to(device)
    if cfg["channels_last"]:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    model = raw_model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        model = torch.compile(model)
    opt = make_optimizer(cfg, raw_model, steps_per_epoch)
    # on SAM's base optimizer: the same param_groups, and no warning that opt.step() is never called
    sched = torch.optim.lr_scheduler.LambdaLR(getattr(opt, "base_optimizer", opt), lambda t: 0.5 * (1 + math.cos(math.pi * t / total_steps)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if cfg["amp"] == "bf16" else torch.float16,
                              enabled=cfg["amp"] != "none")
    scaler = torch.amp.GradScaler(device.type) if cfg["amp"] == "fp16" else None
    g = torch.Generator().manual_seed(cfg["seed"])  # data order, augmentation, Fisher images: all from here
    sparse = cfg["optimizer"] in ("ssamf", "ssamd", "samon")

    # resume
    start_epoch, elapsed = 0, 0.0
    if cfg["resume"]:
        ck = load_checkpoint(ckpt_path, cfg)
        raw_model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(ck["scaler"])
        g.set_state(ck["data_rng"])
        torch.set_rng_state(ck["torch_rng"])
        if device.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
        if imagenet:
            data.epoch = ck["epoch"]
        start_epoch, elapsed = ck["epoch"], ck["elapsed"]
        if master:
            console.print(f"resumed {ckpt_path} at epoch {start_epoch}/{cfg['epochs']}")
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "final.json").unlink(missing_ok=True)  # only a finished run has one (scripts/reproduce.py skips those)
        log_path = out_dir / "metrics.jsonl"
        lines = log_path.read_text().splitlines() if cfg["resume"] and log_path.exists() else []
        # keep only the epochs the checkpoint has (a crash between log line and checkpoint would repeat one)
        log_path.write_text("".join(l + "\n" for l in lines if json.loads(l)["epoch"] <= start_epoch))

    def evaluate():
        model.eval()
        correct, n = torch.zeros((), device=device), torch.zeros((), device=device)
        with torch.no_grad(), autocast:
            for x, y in data.test_batches():
                if cfg["channels_last"]:
                    x = x.contiguous(memory_format=torch.channels_last)
                correct += (model(x).argmax(1) == y).sum()
                n += len(y)
        if world > 1:
            dist.all_reduce(correct), dist.all_reduce(n)
        model.train()
        return (correct / n).item()

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=not master, transient=False)
    epoch_log, test_acc, step_times = None, float("nan"), []
    with progress:
        for epoch in range(start_epoch, cfg["epochs"]):
            model.train()
            task = progress.add_task(f"epoch {epoch + 1}/{cfg['epochs']}", total=steps_per_epoch, metrics="")
            loss_sum, correct, seen = (torch.zeros((), device=device) for _ in range(3))
            t0, data_time, masks_updated = time.perf_counter(), 0.0, 0
            batches = data.batches(g)
            for step in range(steps_per_epoch):
                td = time.perf_counter()
                x, y = next(batches)
                if cfg["channels_last"]:
                    x = x.contiguous(memory_format=torch.channels_last)
                data_time += time.perf_counter() - td
                if cfg["optimizer"] == "ssamf" and opt.mask_update_due:
                    # Fisher (Eq. 5) on the bare model (no DDP hooks), then rank 0's mask everywhere. The model
                    # is in train mode: each sample is normalized alone; running stats are not touched (ssam.py).
                    opt.update_mask(raw_model, data.fisher_batches(g, cfg["num_samples"]))
                    masks_updated += 1
                    if world > 1:
                        broadcast_masks(opt)
                mask_step = opt.last_mask_update if cfg["optimizer"] == "ssamd" else None
                loss, out = train_step(model, opt, x, y, autocast, scaler, cfg.get("sync_ascent", False))
                if cfg["optimizer"] == "ssamd" and opt.last_mask_update != mask_step:
                    masks_updated += 1  # SSAM-D drew a new mask in first_step, from this process's gradient
                    if world > 1:
                        broadcast_masks(opt)
                sched.step()
                loss_sum += loss * len(y)
                correct += (out.argmax(1) == y).sum()
                seen += len(y)
                if master and (step % 10 == 0 or step == steps_per_epoch - 1):  # .item() syncs: not every step
                    progress.update(task, completed=step + 1, metrics=f"loss {(loss_sum / seen).item():.3f} "
                                    f"acc {(correct / seen).item():.3f} lr {sched.get_last_lr()[0]:.4f}")
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_time = time.perf_counter() - t0
            if world > 1:
                for t in (loss_sum, correct, seen):
                    dist.all_reduce(t)
            last = epoch + 1 == cfg["epochs"]
            test_acc = evaluate() if last or (epoch + 1) % cfg.get("eval_every", 1) == 0 else None
            elapsed += time.perf_counter() - t0
            step_times.append(train_time / steps_per_epoch)
            epoch_log = dict(epoch=epoch + 1, loss=(loss_sum / seen).item(), acc=(correct / seen).item(),
                             test_acc=test_acc, lr=sched.get_last_lr()[0], time=train_time,
                             step_ms=1000 * train_time / steps_per_epoch, data_share=data_time / train_time,
                             density=opt.density() if sparse else 1.0, masks_updated=masks_updated)
            if world > 1:  # all processes must hold the same weights and masks, or something is broken
                mine = fingerprint(raw_model, opt)
                fps = [torch.zeros_like(mine) for _ in range(world)]
                dist.all_gather(fps, mine)
                epoch_log["ranks_in_sync"] = all(torch.equal(fps[0], f) for f in fps)
                if not epoch_log["ranks_in_sync"]:
                    raise RuntimeError(f"processes diverged at epoch {epoch + 1}: weights or masks differ")
            progress.update(task, metrics=f"loss {epoch_log['loss']:.3f} acc {epoch_log['acc']:.3f} " +
                            (f"test {test_acc:.3f}" if test_acc is not None else "") + (f" density {epoch_log['density']:.3f}" if sparse else ""))
            if master:
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(epoch_log) + "\n")
                save_checkpoint(ckpt_path, config=cfg, epoch=epoch + 1, elapsed=elapsed,
                                model=raw_model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                scaler=scaler.state_dict() if scaler is not None else None, data_rng=g.get_state(),
                                torch_rng=torch.get_rng_state(),
                                cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    if epoch_log is None:  # resumed a finished run: nothing trained, just measure
        test_acc = evaluate()
    result = dict(config=cfg, test_acc=test_acc, train_acc=epoch_log["acc"] if epoch_log else None,
                  epochs=cfg["epochs"], time_s=elapsed, step_ms=1000 * float(np.median(step_times)) if step_times
                  else None, density=opt.density() if sparse else 1.0, processes=world, device=str(device),
                  torch=torch.__version__)
    if master:
        (out_dir / "final.json").write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"[bold]{cfg['name']}[/]: test accuracy {test_acc:.4f}, {result['step_ms'] or 0:.0f} ms/step, "
                      f"{elapsed:.0f} s -> {out_dir / 'final.json'}")
    return result


# -----------------------------------------------------------------------------------------------------------
# Grids of runs: ONE naming rule and ONE "done" rule for the demo, bench/accuracy.py and scripts/reproduce.py
# -----------------------------------------------------------------------------------------------------------
def grid_run(flags, root):
    """train.py flags (a list) -> the run's config, in <root>/<name>. The name comes from the config:
    <preset>-<optimizer>[-s<sparsity>]-seed<seed>, then every setting that differs from the preset's recipe,
    e.g. cifar10-resnet18-sgd-seed0-epochs1-train-size256; cfg["recipe"] is True when nothing differs."""
    args = get_args(flags)
    if args.name or args.out_dir or args.demo:
        raise ValueError(f"grid_run names the run itself: drop --name/--out-dir/--demo from {flags}")
    cfg = resolve_config(args)
    base = ["--preset", args.preset, "--optimizer", cfg["optimizer"], "--seed", str(cfg["seed"])]
    recipe = resolve_config(get_args(base + (["--sparsity", str(cfg["sparsity"])] if "sparsity" in cfg else [])))
    differ = [k for k in cfg if k not in RESUME_FREE and cfg[k] != recipe.get(k)]
    cfg["name"] = recipe["name"] + "".join(f"-{k.replace('_', '-')}" + ("" if cfg[k] is True else str(cfg[k]).replace(
        ":", "of")) for k in differ)
    cfg["out_dir"] = str(Path(root) / cfg["name"])
    return cfg, not differ


def config_diff(saved, cfg):
    """Keys (other than where and how a run is stored or resumed) whose values differ, as 'k=saved (now x)'."""
    return [f"{k}={saved.get(k)!r} (now {cfg.get(k)!r})" for k in sorted(set(saved) | set(cfg))
            if k not in RESUME_FREE and saved.get(k) != cfg.get(k)]


def run_state(cfg):
    """'done' (final.json records this config), 'resume' (ckpt.pt of this config), 'todo' (neither), or
    'other: <diff>' when the folder holds a run of another config."""
    d = Path(cfg["out_dir"])
    if (d / "final.json").exists():
        diff = config_diff(json.loads((d / "final.json").read_text())["config"], cfg)
        return "done" if not diff else "other: " + ", ".join(diff)
    if (d / "ckpt.pt").exists():
        saved = torch.load(d / "ckpt.pt", map_location="cpu", weights_only=False, mmap=True)["config"]
        diff = config_diff(saved, cfg)
        return "resume" if not diff else "other: " + ", ".join(diff)
    return "todo"


def run_grid(grid, root, fresh=False, launch=None, jobs=1, env=None, dry_run=False):
    """Train every run of `grid` (a list of train.py flag lists) that is not done; returns [(cfg, final)]
    in grid order (final = final.json, None on a dry run). A done run is reused, an interrupted one resumed;
    a folder holding another config is refused unless fresh (then it is trained again from scratch).
    launch=None trains in this process, one run after another (the demo); otherwise each run is the command
    launch + [train.py, flags...] (e.g. [sys.executable] or torchrun ...), `jobs` at a time, its output in
    <out_dir>/train.log when jobs > 1."""
    import shlex
    import subprocess
    plan = []
    for flags in grid:
        cfg, recipe = grid_run(flags, root)
        st = run_state(cfg)
        if st.startswith("other") and not fresh:
            raise SystemExit(f"{cfg['out_dir']} holds a run of another config ({st[7:]}): move it away, or pass "
                             f"--fresh to train it again with the config asked for")
        st = "todo" if fresh else st
        console.print(f"[{len(plan) + 1}/{len(grid)}] {st:6} {cfg['name']}" + ("" if recipe else "  (not the recipe)"),
                      soft_wrap=True)
        plan.append((flags, cfg, st))
    running = []

    def wait(until):                                     # reap finished subprocesses until len(running) <= until
        while len(running) > until:
            time.sleep(0.2)
            for item in [r for r in running if r[0].poll() is not None]:
                running.remove(item)
                proc, log, c = item
                if log:
                    log.close()
                if proc.returncode != 0:
                    for other, _, _ in running:
                        other.kill()
                    tail = (Path(c["out_dir"]) / "train.log").read_text()[-3000:] if log else ""
                    raise SystemExit(f"{tail}\ntrain.py failed (exit {proc.returncode}) for {c['name']}: fix it "
                                     f"and rerun (finished runs are kept)")
                console.print(f"finished {c['name']}", soft_wrap=True)

    for i, (flags, cfg, st) in enumerate(plan):
        if dry_run or st == "done":
            continue
        cfg["resume"], cfg["fresh"] = st == "resume", st != "resume"
        if launch is None:
            console.rule(f"[bold]{cfg['name']}")
            train(cfg, show_config=i == 0)
            continue
        cmd = list(launch) + [str(ROOT / "train.py"), *flags, "--name", cfg["name"], "--out-dir", cfg["out_dir"],
                              "--resume" if cfg["resume"] else "--fresh"]
        console.print("   " + shlex.join(cmd), soft_wrap=True, markup=False)
        Path(cfg["out_dir"]).mkdir(parents=True, exist_ok=True)
        log = open(Path(cfg["out_dir"]) / "train.log", "w") if jobs > 1 else None
        running.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), log, cfg))
        wait(jobs - 1)
    wait(0)
    out = []
    for flags, cfg, st in plan:
        f = Path(cfg["out_dir"]) / "final.json"
        out.append((cfg, json.loads(f.read_text()) if f.exists() and not dry_run else None))
    return out


# -----------------------------------------------------------------------------------------------------------
# Demo: the four optimizers on the shipped subset, one table (make demo)
# -----------------------------------------------------------------------------------------------------------
def demo(argv):
    """SGD, SAM, SSAM-F, SSAM-D with the other flags given, runs in runs/demo/ (or --out-dir); finished runs of
    the same config are reused (--fresh trains again). Prints accuracy, cost and the Hessian's lambda_1."""
    sys.path.insert(0, str(ROOT / "bench"))
    import sharpness                                     # bench/sharpness.py: Lanczos on Hessian-vector products
    args, t0 = get_args(argv), time.perf_counter()
    keep, skip = [], 0
    for a in argv:                                       # the runner names the runs: drop the flags it sets
        if skip:
            skip -= 1
        elif a in ("--out-dir", "--name", "--optimizer"):
            skip = 1
        elif a not in ("--demo", "--fresh", "--resume") and not a.startswith(("--out-dir=", "--name=", "--optimizer=")):
            keep.append(a)
    if args.eval_every is None:                          # 10,000 test images: measure once, at the end
        keep += ["--eval-every", str(args.epochs or PRESETS[args.preset][2])]
    root = args.out_dir or ROOT / "runs" / "demo"
    runs = run_grid([keep + ["--optimizer", o] for o in ("sgd", "sam", "ssamf", "ssamd")], root, fresh=args.fresh)
    rows = []
    for cfg, r in runs:
        t1 = time.perf_counter()
        model, _ = sharpness.load_run(Path(cfg["out_dir"]) / "ckpt.pt", "cpu")
        x, y = sharpness.train_batch(cfg, min(128, cfg.get("train_size") or 128), "cpu")
        lam = sharpness.top_eigenvalues(model, x, y, k=1, iters=DEMO_HVPS)[0]
        rows.append((cfg, r, lam, time.perf_counter() - t1))
    sgd_ms, c0 = rows[0][1]["step_ms"], rows[0][0]
    n_test = len(load_cifar(c0)[3]) if c0["dataset"] != "imagenet" else "?"
    table = Table("optimizer", "sparsity", "test acc", "ms/step", "x SGD", "mask density", "Hessian lambda_1",
                  title=f"{c0['preset']}: {c0['model']}, {c0['epochs']} epochs, {n_test} test images, "
                        f"{rows[0][1]['device']}, total {time.perf_counter() - t0:.0f} s")
    for cfg, r, lam, _ in rows:
        table.add_row(cfg["optimizer"], f"{cfg.get('sparsity', '-')}", f"{100 * r['test_acc']:.1f}%",
                      f"{r['step_ms']:.0f}", f"{r['step_ms'] / sgd_ms:.2f}", f"{r['density']:.3f}", f"{lam:.0f}")
    Console().print(table)
    Console().print(f"lambda_1: top eigenvalue of the training-loss Hessian on 128 training images ({DEMO_HVPS} "
                    f"Lanczos steps, {sum(r[3] for r in rows):.0f} s for all four): lower = flatter minimum, what "
                    "SAM is for. One seed after a few epochs; the converged comparison (seeds, confidence intervals) "
                    "is `make bench-accuracy` -> bench/results/accuracy.md.")


DEMO_HVPS = 10   # lambda_1 agreed with 20 and 40 steps to 3 digits on a wrn10-1 checkpoint (bench/sharpness.py)


if __name__ == "__main__":
    args = get_args()
    if args.demo:
        demo(sys.argv[1:])
    else:
        train(resolve_config(args))
    if dist.is_initialized():
        dist.destroy_process_group()
