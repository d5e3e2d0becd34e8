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
ckpt.pt (written atomically every epoch), final.json (only once the run has finished) and, while a run
writes there, lock. A run that diverges (NaN/inf loss or weights) stops with exit status 1.
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
import shutil
import socket
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
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
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
    "cifar10-subset": ("cifar10-subset", "wrn10-1", 6, 64, 0.05, 5e-4, 1e-3, 0.1),  # demo (see below)
    "cifar10-resnet18": ("cifar10", "resnet18", 200, 128, 0.05, 5e-4, 1e-3, 0.1),  # Table 1
    "cifar100-resnet18": ("cifar100", "resnet18", 200, 128, 0.05, 5e-4, 1e-3, 0.2),  # Table 1
    "cifar10-wrn28-10": ("cifar10", "wrn28-10", 200, 128, 0.05, 5e-4, 1e-3, 0.1),  # Table 2
    "cifar100-wrn28-10": ("cifar100", "wrn28-10", 200, 128, 0.05, 5e-4, 1e-3, 0.2),  # Table 2
    "imagenet-resnet50": ("imagenet", "resnet50", 90, 256, 0.1, 1e-4, 1e-4, 0.07),  # Table 3
}
# Why the demo preset is what it is (2-core CPU, SGD): wrn10-1 ran an epoch of the subset in 3.9 s at batch 64 and
# 4.9 s at batch 128, and reached 42.8% / 37.6% test accuracy after 5 epochs; wrn16-1 reached 34% in 3 epochs of
# about the same time. 6 epochs keep all four optimizers of --demo under 5 minutes (SAM-type steps cost 2 passes):
# `make demo` took 370 s with 8 epochs on an idle box (SGD 79, SAM 148, SSAM-F 155, SSAM-D 148 ms/step).
# Shared by every preset (§5.1): SGD momentum 0.9, cosine LR, crop+flip (+Cutout 16x16 on CIFAR).
MOMENTUM = 0.9
CIFAR_MEAN, CIFAR_STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)  # per channel, 0..255 pixel units
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Keys that may change between a run and its --resume without changing what is trained.
RESUME_FREE = {
    "resume",
    "fresh",
    "out_dir",
    "name",
    "data_dir",
    "cache_dir",
    "workers",
    "device",
    "compile",
    "eval_every",
}
# Defaults of the flags that are not part of a preset. The flags themselves default to None, so that a flag the
# user gave can be told from a default (a given flag that the run would ignore is an error, see resolve_config).
DEFAULTS = dict(
    cutout=16,
    train_size=0,
    seed=0,
    optimizer="sgd",
    sparsity=0.5,
    structure="unstructured",
    update_interval=0,
    num_samples=128,
    drop_rate=0.5,
    amp="none",
    workers=8,
    mask_select="paper",
    ascent_fraction=1.0,
    label_noise=0.0,
    eval_every=1,
)
SAM_TYPES = ("sam", "ssamf", "ssamd", "samon")
# Optimizer flags and the optimizers that read them; given with any other optimizer, the flag is an error.
USED_BY = dict(
    rho=SAM_TYPES,
    adaptive=("sam",),
    sync_ascent=SAM_TYPES,
    sparsity=("ssamf", "ssamd"),
    structure=("ssamf", "ssamd"),
    update_interval=("ssamf", "ssamd"),
    num_samples=("ssamf",),
    drop_rate=("ssamd",),
    mask_select=("ssamf", "ssamd"),
    sparse_ascent=("ssamf", "ssamd"),
    ascent_fraction=SAM_TYPES,
)
# What each numeric flag allows: (test, words for the error message).
ALLOWED = dict(
    epochs=(lambda v: v >= 1, "an integer >= 1"),
    batch_size=(lambda v: v >= 1, "an integer >= 1"),
    lr=(lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    weight_decay=(lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    rho=(lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    cutout=(lambda v: v >= 0, "0 (off) or a square side in pixels >= 1"),
    train_size=(lambda v: v >= 0, "0 (all images) or a number of images >= 1"),
    seed=(lambda v: v >= 0, "an integer >= 0"),
    sparsity=(lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    update_interval=(lambda v: v >= 0, "0 (once an epoch) or a number of steps >= 1"),
    num_samples=(lambda v: v >= 1, "an integer >= 1"),
    drop_rate=(lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    workers=(lambda v: v >= 0, "an integer >= 0"),
    label_noise=(lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    eval_every=(lambda v: v >= 1, "an integer >= 1"),
)


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    d = DEFAULTS
    a(
        "--preset",
        default="cifar10-subset",
        help=f"recipe to start from: {', '.join(PRESETS)} (default: %(default)s)",
    )
    a(
        "--demo",
        action="store_true",
        help="train SGD, SAM, SSAM-F, SSAM-D on the preset and print a comparison table",
    )
    g = ap.add_argument_group("recipe (default: the preset's value)")
    g.add_argument("--dataset", help="cifar10-subset | cifar10 | cifar100 | imagenet")
    g.add_argument(
        "--data-dir",
        help="CIFAR: ImageFolder tree <dir>/{train,test}/<class>/*.jpg, or torchvision's "
        "download folder (default data/<dataset>); ImageNet: <dir>/{train,val}/<class>/*",
    )
    g.add_argument(
        "--cache-dir",
        help="where an ImageFolder tree's decoded tensors are cached (default: "
        "$SSAM_CACHE_DIR, else $XDG_CACHE_HOME/ssam, else ~/.cache/ssam)",
    )
    g.add_argument("--model", help="resnet18 | resnet50 | wrn<depth>-<width>, e.g. wrn28-10, wrn16-1")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch, split over torchrun's processes")
    g.add_argument("--lr", type=float, help="peak learning rate; cosine decay to 0 over all steps")
    g.add_argument("--weight-decay", type=float, help="default: the preset's wd for SGD, or for SAM/SSAM")
    g.add_argument("--rho", type=float, help="SAM/SSAM perturbation radius")
    g.add_argument(
        "--cutout",
        type=int,
        help=f"Cutout square side on CIFAR, applied with p=0.5; 0 = off (default: {d['cutout']})",
    )
    g.add_argument(
        "--train-size", type=int, help="CIFAR: train on a fixed random N-image part (0 = all; tests)"
    )
    g.add_argument(
        "--seed", type=int, help="model init, data order, augmentation, SSAM-D growth (default: 0)"
    )
    g.add_argument(
        "--label-noise",
        type=float,
        help="CIFAR: give this fraction of the training images a wrong "
        f"label, drawn once with a fixed seed (the same for every --seed) (default: {d['label_noise']})",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        help="test accuracy every N epochs and after the last (default: 1; --demo: only after the last)",
    )
    g = ap.add_argument_group("optimizer")
    g.add_argument(
        "--optimizer",
        help="sgd | sam | ssamf | ssamd | samon (SAM on normalization layers only) "
        f"(default: {d['optimizer']})",
    )
    g.add_argument(
        "--sparsity",
        type=float,
        help="SSAM: fraction of weights NOT perturbed; the paper "
        f"uses 0.5, 0.8, 0.9, 0.95, 0.98, 0.99 (default: {d['sparsity']})",
    )
    g.add_argument(
        "--structure",
        help="SSAM mask: unstructured | 2:4 (needs sparsity 0.5) | tensor (whole "
        f"tensors; skips their ascent weight gradient) (default: {d['structure']})",
    )
    g.add_argument(
        "--mask-select",
        help="--structure tensor: paper (the tensors of highest mean score) | cost (most "
        f"score per unit of ascent-pass cost, ssam.cost_tensor_masks) (default: {d['mask_select']})",
    )
    g.add_argument(
        "--update-interval",
        type=int,
        help="steps between SSAM mask updates; 0 = once an "
        f"epoch, as in the authors' code (default: {d['update_interval']})",
    )
    g.add_argument(
        "--num-samples",
        type=int,
        help=f"SSAM-F: training images for the Fisher estimate (N_F, Eq. 5) (default: {d['num_samples']})",
    )
    g.add_argument(
        "--drop-rate",
        type=float,
        help="SSAM-D: fraction of the mask dropped and regrown "
        f"at each update (alpha, Eq. 9; cosine-decayed) (default: {d['drop_rate']})",
    )
    g.add_argument("--adaptive", action="store_true", help="SAM: adaptive (ASAM) perturbation")
    g.add_argument(
        "--sparse-ascent",
        action="store_true",
        help="ssamf/ssamd with --structure 2:4: nn.Linear input "
        "gradients of the ascent pass through W ⊙ M (ssam.sparse_ascent; 2:4 tensor cores on CUDA with --amp)",
    )
    g.add_argument(
        "--ascent-fraction",
        type=float,
        help="SAM-type: run the first (ascent) pass on "
        f"the first f of each batch, the second on all of it; 0 < f <= 1 (default: {d['ascent_fraction']})",
    )
    g.add_argument(
        "--sync-ascent",
        action="store_true",
        help="DDP: all-reduce the ascent (first) gradient too; "
        "default off = each process perturbs with its own batch's gradient, as in the SAM paper",
    )
    g = ap.add_argument_group("system")
    g.add_argument("--device", help="cuda | cpu | cuda:N (default: cuda if available)")
    g.add_argument("--amp", help=f"none | bf16 | fp16 (fp16 with a GradScaler) (default: {d['amp']})")
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the model (the CPU needs a C compiler)"
    )
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument("--workers", type=int, help=f"ImageNet DataLoader workers (default: {d['workers']})")
    g.add_argument("--name", help="run name (default: <preset>-<optimizer>[-s<sparsity>]-seed<seed>)")
    g.add_argument("--out-dir", help="default runs/<name>")
    g.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    g.add_argument("--fresh", action="store_true", help="start over even if <out-dir> holds a checkpoint")
    args = ap.parse_args(argv)
    if args.preset not in PRESETS:
        raise SystemExit(f"unknown --preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    return args


def flag(key):
    return "--" + key.replace("_", "-")


def resolve_config(args):
    """Preset values, then DEFAULTS, overridden by every flag that was given. Returns a plain dict. Every value
    is checked here: a bad value, or a flag the run would ignore, is a one-line SystemExit saying what to pass."""
    given = {
        k: v
        for k, v in vars(args).items()
        if v is not None and v is not False and k not in ("demo", "preset")
    }
    cfg = {
        **dict(zip(PRESET_KEYS, PRESETS[args.preset])),
        **DEFAULTS,
        "resume": False,
        "fresh": False,
        "compile": False,
        "channels_last": False,
        "adaptive": False,
        "sync_ascent": False,
    }
    for k, v in vars(args).items():
        if v is not None and k not in ("weight_decay", "demo"):
            cfg[k] = v
    cfg["optimizer"] = cfg["optimizer"].lower()
    if cfg["optimizer"] not in ("sgd", "sam", "ssamf", "ssamd", "samon"):
        raise SystemExit(f"unknown --optimizer {cfg['optimizer']!r}: choose sgd, sam, ssamf, ssamd or samon")
    if cfg["structure"] not in ("unstructured", "2:4", "tensor"):
        raise SystemExit(f"unknown --structure {cfg['structure']!r}: choose unstructured, 2:4 or tensor")
    if cfg["structure"] == "2:4" and cfg["sparsity"] != 0.5 and cfg["optimizer"] in ("ssamf", "ssamd"):
        raise SystemExit(
            f"--structure 2:4 perturbs 2 of every 4 weights: it needs --sparsity 0.5, not {cfg['sparsity']}"
        )
    if cfg["sparse_ascent"] and not (cfg["optimizer"] in ("ssamf", "ssamd") and cfg["structure"] == "2:4"):
        raise SystemExit(
            f"--sparse-ascent needs --optimizer ssamf or ssamd with --structure 2:4, not --optimizer "
            f"{cfg['optimizer']} --structure {cfg['structure']}: it multiplies by the 2:4-masked weight"
        )
    if not cfg["sparse_ascent"]:
        cfg.pop("sparse_ascent")  # off: keep it out of the config (and old checkpoints' configs)
    if cfg["dataset"] not in ("cifar10-subset", "cifar10", "cifar100", "imagenet"):
        raise SystemExit(
            f"unknown --dataset {cfg['dataset']!r}: choose cifar10-subset, cifar10, cifar100 or imagenet"
        )
    if cfg["amp"] not in ("none", "bf16", "fp16"):
        raise SystemExit(f"unknown --amp {cfg['amp']!r}: choose none, bf16 or fp16")
    if not 0 < cfg["ascent_fraction"] <= 1:
        raise SystemExit(
            f"--ascent-fraction {cfg['ascent_fraction']} is not in (0, 1]: the share of the batch the "
            "first pass sees"
        )
    if cfg["mask_select"] not in ("paper", "cost"):
        raise SystemExit(f"unknown --mask-select {cfg['mask_select']!r}: choose paper or cost")
    if cfg["mask_select"] == "cost" and (
        cfg["structure"] != "tensor" or cfg["optimizer"] not in ("ssamf", "ssamd")
    ):
        raise SystemExit(
            "--mask-select cost picks whole tensors: it needs --optimizer ssamf or ssamd and --structure tensor"
        )
    for k, default in (("ascent_fraction", 1.0), ("mask_select", "paper"), ("label_noise", 0.0)):
        if cfg[k] == default:  # defaults stay out of the config: older checkpoints still resume
            cfg.pop(k)
    wd_sgd, wd_sam = cfg.pop("wd_sgd"), cfg.pop("wd_sam")
    wd = wd_sgd if cfg["optimizer"] == "sgd" else wd_sam
    cfg["weight_decay"] = args.weight_decay if args.weight_decay is not None else wd
    for k, (ok, allowed) in ALLOWED.items():
        if k in cfg and not ok(cfg[k]):  # (flags at their default may have left cfg above)
            raise SystemExit(f"{flag(k)} {cfg[k]!r}: must be {allowed}")
    if cfg["resume"] and cfg["fresh"]:
        raise SystemExit("--resume and --fresh contradict each other: pass one of them")
    # flags this run would ignore: errors, since a result must be what its command line says
    ignored = []
    if not getattr(args, "demo", False):  # the demo runs every optimizer with the same flags
        ignored += [
            (k, f"it is used by --optimizer {' / '.join(USED_BY[k])} only, not {cfg['optimizer']}")
            for k in USED_BY
            if k in given and cfg["optimizer"] not in USED_BY[k]
        ]
    dataset = cfg["dataset"]
    if dataset == "cifar10-subset":
        ignored += [
            (
                k,
                "--dataset cifar10-subset is the subset shipped in data/; to train on a tree of your own, "
                "pass --dataset cifar10 or cifar100 (or a --preset cifar10-*/cifar100-*)",
            )
            for k in ("data_dir", "cache_dir")
            if k in given
        ]
    if dataset == "imagenet":
        ignored += [
            (k, "ImageNet uses RandomResizedCrop + flip and the whole train/ folder")
            for k in ("cutout", "train_size", "label_noise")
            if k in given
        ]
        ignored += (
            [("cache_dir", "ImageNet is read by DataLoader workers, never cached")]
            if "cache_dir" in given
            else []
        )
    elif "workers" in given:
        ignored += [("workers", "CIFAR sits on the device as one tensor; there are no DataLoader workers")]
    if ignored:
        k, why = ignored[0]
        raise SystemExit(f"{flag(k)} would be ignored: {why}. Drop {flag(k)} or change the run as said")
    if cfg["optimizer"] in (
        "sgd",
        "sam",
        "samon",
    ):  # these knobs mean nothing there; keep them out of names and checks
        for k in ("sparsity", "structure", "update_interval", "num_samples", "drop_rate"):
            cfg.pop(k)
    if cfg["optimizer"] == "sgd":
        cfg.pop("rho"), cfg.pop("adaptive"), cfg.pop("sync_ascent"), cfg.pop("ascent_fraction", None)
    if not cfg.get("name"):
        sp = f"-s{cfg['sparsity']:g}" if "sparsity" in cfg else ""
        sp += (
            f"-{cfg['structure'].replace(':', 'of')}"
            if cfg.get("structure", "unstructured") != "unstructured"
            else ""
        )
        sp += "-cost" if "mask_select" in cfg else ""
        sp += f"-f{cfg['ascent_fraction']:g}" if "ascent_fraction" in cfg else ""
        cfg["name"] = f"{args.preset}-{cfg['optimizer']}{sp}-seed{cfg['seed']}"
    cfg["out_dir"] = cfg.get("out_dir") or str(ROOT / "runs" / cfg["name"])
    return cfg


# -----------------------------------------------------------------------------------------------------------
# Data: CIFAR lives on the training device as one uint8 tensor; whole batches are augmented there.
# -----------------------------------------------------------------------------------------------------------
def decode_jpegs(blobs):
    """list of JPEG files (bytes) -> (N, 3, H, W) uint8, decoded with Pillow (as torchvision's ImageFolder)."""
    return (
        torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]))
        .permute(0, 3, 1, 2)
        .contiguous()
    )


@functools.lru_cache(maxsize=1)  # decoded once per process (the demo trains four times)
def load_subset():
    path = ROOT / "data" / "cifar10_subset.npz"
    if not path.exists():
        raise SystemExit(
            f"{path} is missing: it ships with the repo; remake it with "
            "`python scripts/make_subset.py /path/to/cifar10-jpeg.tar.gz`"
        )
    z = np.load(path)
    out = []
    for split in ("train", "test"):
        buf, off = z[f"{split}_jpeg"].tobytes(), z[f"{split}_offsets"]
        x = decode_jpegs([buf[off[i] : off[i + 1]] for i in range(len(off) - 1)])
        out += [x, torch.from_numpy(z[f"{split}_labels"].astype(np.int64))]
    return out


def cache_dir(cfg):
    """Where decoded ImageFolder trees are cached: outside the source tree, in the user's cache directory."""
    d = cfg.get("cache_dir") or os.environ.get("SSAM_CACHE_DIR")
    if not d:
        d = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssam"
    return Path(d).expanduser()


def decode_image_file(f):
    """One image file -> (H, W, 3) uint8; an unreadable file is an error that names it."""
    try:
        with Image.open(f) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError, "image file is truncated", ...
        raise SystemExit(
            f"{f}: not a readable image ({type(e).__name__}: {e}); delete or replace it"
        ) from None


def load_image_folder_tensor(root, cache_root):
    """<root>/{train,test}/<class>/*.jpg -> [train_x, train_y, test_x, test_y], decoded once and cached in
    cache_root. The cache key covers every file's path (so its class), size and mtime: any change re-decodes."""
    root = Path(root).resolve()
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    files = {s: sorted(f for f in (root / s).glob("*/*") if f.is_file()) for s in ("train", "test")}
    for s in ("train", "test"):
        bad = [f for f in files[s] if f.parent.name not in classes]
        if bad:
            raise SystemExit(f"{bad[0]}: class folder {bad[0].parent.name!r} is in {s}/ but not in train/")
    h = hashlib.sha256(f"{root}|{classes}".encode())
    for s in ("train", "test"):
        for f in files[s]:
            st = f.stat()
            h.update(f"|{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    cache = Path(cache_root) / f"{root.name}-{h.hexdigest()[:16]}.pt"
    if cache.exists():
        return torch.load(cache)
    out = []
    with console.status(
        f"decoding {len(files['train']) + len(files['test'])} images from {root} (once; cached in {cache})"
    ):
        for s in ("train", "test"):
            imgs = [decode_image_file(f) for f in files[s]]
            for f, im in zip(files[s], imgs):
                if im.shape != imgs[0].shape:
                    raise SystemExit(
                        f"{f}: image is {im.shape[1]}x{im.shape[0]}, but {files[s][0]} is "
                        f"{imgs[0].shape[1]}x{imgs[0].shape[0]}: all images must have one size"
                    )
            x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
            y = torch.tensor([classes.index(f.parent.name) for f in files[s]])
            out += [x, y]
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, tmp)
        os.replace(tmp, cache)
    except OSError as e:  # read-only home, full disk: the decoded tensors are still good
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        console.print(
            f"[yellow]warning:[/] could not write the decoded cache {cache} ({type(e).__name__}: {e}); "
            f"training from memory. Pass --cache-dir (or set SSAM_CACHE_DIR) to a writable folder "
            f"to decode only once"
        )
    return out


def load_cifar(cfg):
    """-> train_x, train_y, test_x, test_y: uint8 (N, 3, 32, 32) and int64 (N,), on the CPU."""
    name = cfg["dataset"]
    if name == "cifar10-subset":
        return load_subset()
    num_classes = 100 if name == "cifar100" else 10
    root = Path(cfg.get("data_dir") or ROOT / "data" / name)
    if (root / "train").is_dir() or (root / "test").is_dir():
        for s in ("train", "test"):
            if not (root / s).is_dir() or not any(d.is_dir() for d in (root / s).iterdir()):
                raise SystemExit(
                    f"{root}: expected an ImageFolder tree {root}/{{train,test}}/<class>/*.jpg, but "
                    f"{root / s} is missing or has no class folders"
                )
        classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
        if len(classes) != num_classes:  # before decoding anything
            shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
            raise SystemExit(
                f"{root}/train has {len(classes)} class folders ({shown}), but --dataset {name} has "
                f"{num_classes} classes: pass the --dataset (or --preset) that matches the tree"
            )
        return load_image_folder_tensor(root, cache_dir(cfg))
    if cfg.get("cache_dir"):
        raise SystemExit(
            f"--cache-dir would be ignored: {root} is not an ImageFolder tree (torchvision's {name} files "
            "are read directly, never cached). Drop --cache-dir"
        )
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    if root.exists() and any(root.iterdir()) and not any(root.glob("cifar-*-python*")):
        raise SystemExit(
            f"{root} holds neither an ImageFolder tree ({root}/train/<class>/*.jpg and {root}/test/...) "
            f"nor torchvision's {name} files (cifar-*-python): point --data-dir at one of those"
        )
    out = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=True)
        except Exception as e:  # offline, disk full, corrupt download: say what to do instead
            raise SystemExit(
                f"could not load or download {name} into {root} ({type(e).__name__}: {e}). Offline? "
                f"Put torchvision's {name} files there, or pass --data-dir with an ImageFolder tree "
                f"<dir>/{{train,test}}/<class>/*.jpg, or use --dataset cifar10-subset"
            ) from None
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
    rows = dy[:, None] + torch.arange(H, device=x.device)  # (B, H) rows of the padded image
    cols = dx[:, None] + torch.arange(W, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    xp = F.pad(x, (pad, pad, pad, pad))
    x = xp[
        torch.arange(B, device=x.device)[:, None, None, None],
        torch.arange(C, device=x.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    x = normalize(x)
    if (
        cutout > 0
    ):  # Cutout [DeVries & Taylor]: zero (= the mean, after normalization) a square around a random center
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
    idx = torch.randperm(len(y), generator=g)[: round(p * len(y))]
    y = y.clone()
    y[idx] = (y[idx] + torch.randint(1, num_classes, (len(idx),), generator=g)) % num_classes
    return y


class CifarOnDevice:
    """Train/test tensors on the device; batches(g) yields this process's share of each global batch."""

    def __init__(self, cfg, device, rank, world):
        train_x, train_y, test_x, test_y = load_cifar(cfg)
        if cfg["train_size"] > len(train_y):
            raise SystemExit(
                f"--train-size {cfg['train_size']}: must be at most the {len(train_y)} training images "
                f"of {cfg['dataset']} (or 0 for all)"
            )
        if cfg["train_size"]:
            keep = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))[
                : cfg["train_size"]
            ]
            train_x, train_y = train_x[keep.sort().values], train_y[keep.sort().values]
        self.num_classes = 100 if cfg["dataset"] == "cifar100" else 10
        if cfg.get("label_noise"):  # symmetric noise: exactly round(p*N) images get one of the other labels
            train_y = noisy_labels(train_y, cfg["label_noise"], self.num_classes)
        self.train_x, self.train_y = train_x.to(device), train_y.to(device)
        self.test_x, self.test_y = test_x[rank::world].to(device), test_y[rank::world].to(device)
        self.batch, self.cutout, self.rank, self.world = cfg["batch_size"], cfg["cutout"], rank, world
        self.num_train = len(self.train_y)
        self.steps_per_epoch = len(self.train_y) // self.batch  # the last partial batch is dropped
        if self.steps_per_epoch == 0:
            raise SystemExit(
                f"--batch-size {self.batch} is larger than the {len(self.train_y)} training images"
            )

    def batches(self, g):
        """Same draws from g on every process (the global batch is drawn, then split), so g's state is one."""
        perm = torch.randperm(len(self.train_y), generator=g)
        for i in range(self.steps_per_epoch):
            idx = perm[i * self.batch : (i + 1) * self.batch].to(self.train_y.device)
            x = augment(self.train_x[idx], g, self.cutout)
            yield x[self.rank :: self.world], self.train_y[idx][self.rank :: self.world]

    def fisher_batches(self, g, n):
        """n random augmented training images for SSAM-F's Fisher estimate (not split: each process uses all n)."""
        idx = torch.randperm(len(self.train_y), generator=g)[:n].to(self.train_y.device)
        x, y = augment(self.train_x[idx], g, self.cutout), self.train_y[idx]
        return [(x[i : i + self.batch], y[i : i + self.batch]) for i in range(0, n, self.batch)]

    def test_batches(self):
        for i in range(0, len(self.test_y), 1000):
            yield normalize(self.test_x[i : i + 1000]), self.test_y[i : i + 1000]


def open_image(path):
    """ImageFolder's loader, but an unreadable file is an error that names it (raised in a DataLoader worker,
    so a RuntimeError that the main process re-raises; a SystemExit would only end the worker)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise RuntimeError(
            f"{path}: not a readable image ({type(e).__name__}: {e}); delete or replace it"
        ) from None


class ImageNetLoader:
    """ImageNet from an ImageFolder tree with DataLoader workers (too big to sit on the device)."""

    def __init__(self, cfg, device, rank, world):
        T = torchvision.transforms
        root = Path(cfg.get("data_dir") or ROOT / "data" / "imagenet")
        for s in ("train", "val"):
            if not (root / s).is_dir():
                raise SystemExit(
                    f"ImageNet: {root / s} not found; --data-dir must hold train/<wnid>/*.JPEG and "
                    f"val/<wnid>/*.JPEG (val sorted into class folders)"
                )
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        test_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
        self.train_ds = torchvision.datasets.ImageFolder(
            str(root / "train"), self.train_tf, loader=open_image
        )
        test_ds = torchvision.datasets.ImageFolder(str(root / "val"), test_tf, loader=open_image)
        if test_ds.classes != self.train_ds.classes:
            raise SystemExit(f"ImageNet: {root}/val has different class folders than {root}/train")
        self.num_classes = len(self.train_ds.classes)
        self.local_batch, self.device, self.workers = cfg["batch_size"] // world, device, cfg["workers"]
        # DistributedSampler with world=1 too: the order depends only on (seed, epoch), so resume gets it right.
        self.sampler = torch.utils.data.DistributedSampler(
            self.train_ds, world, rank, seed=cfg["seed"], drop_last=True
        )
        pin = device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            self.train_ds,
            self.local_batch,
            sampler=self.sampler,
            num_workers=self.workers,
            pin_memory=pin,
            drop_last=True,
            persistent_workers=self.workers > 0,
        )
        self.test_loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(test_ds, range(rank, len(test_ds), world)),
            250,
            num_workers=self.workers,
            pin_memory=pin,
        )
        self.num_train = len(self.train_ds)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise SystemExit(
                f"--batch-size {cfg['batch_size']} is larger than the {len(self.train_ds)} training images"
            )
        self.epoch = 0

    def batches(self, g):  # augmentation runs in the workers; g only picks SSAM-F's Fisher images
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def fisher_batches(self, g, n):
        idx = torch.randperm(len(self.train_ds), generator=g)[:n].tolist()
        dl = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.train_ds, idx), self.local_batch, num_workers=min(self.workers, 4)
        )
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
    """SAM-ON (Mueller et al., 2023), a baseline: perturb only the trainable parameters of NORM_LAYERS (chosen by
    module type), eps = rho·(g ⊙ m)/||g ⊙ m||: ssam.SSAMF with a fixed whole-tensor mask that is never updated."""
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


def make_optimizer(cfg, model, steps_per_epoch):
    sgd = dict(lr=cfg["lr"], momentum=MOMENTUM, weight_decay=cfg["weight_decay"])
    o = cfg["optimizer"]
    if o == "sgd":
        return torch.optim.SGD(model.parameters(), **sgd)
    if o == "sam":
        return ssam.SAM(model.parameters(), torch.optim.SGD, rho=cfg["rho"], adaptive=cfg["adaptive"], **sgd)
    if o == "samon":
        return samon(model, torch.optim.SGD, rho=cfg["rho"], **sgd)
    structure = None if cfg["structure"] == "unstructured" else cfg["structure"]
    interval = cfg["update_interval"] or steps_per_epoch
    costs = None  # --mask-select cost: each tensor's ascent cost, from one forward
    if cfg.get("mask_select") == "cost":
        side = 224 if cfg["dataset"] == "imagenet" else 32
        costs = ssam.ascent_costs(
            model, torch.zeros(2, 3, side, side, device=next(model.parameters()).device)
        )
    if o == "ssamf":
        return ssam.SSAMF(
            model.parameters(),
            torch.optim.SGD,
            rho=cfg["rho"],
            sparsity=cfg["sparsity"],
            num_samples=cfg["num_samples"],
            update_interval=interval,
            structure=structure,
            costs=costs,
            **sgd,
        )
    return ssam.SSAMD(
        model.parameters(),
        torch.optim.SGD,
        rho=cfg["rho"],
        sparsity=cfg["sparsity"],
        drop_rate=cfg["drop_rate"],
        update_interval=interval,
        structure=structure,
        total_steps=cfg["epochs"] * steps_per_epoch,
        seed=cfg["seed"],
        costs=costs,
        **sgd,
    )


# -----------------------------------------------------------------------------------------------------------
# One training step. SAM-type: ascent pass, w + e, descent pass with BN statistics frozen, restore, SGD step.
# -----------------------------------------------------------------------------------------------------------
def train_step(
    model, opt, x, y, autocast, scaler=None, sync_ascent=False, sparse_ascent=False, ascent_fraction=1.0
):
    """Returns (loss, logits) of the unperturbed pass. `model` may be DDP-wrapped: the ascent pass then runs
    under no_sync() (no all-reduce) unless sync_ascent; the descent pass all-reduces as usual.
    ascent_fraction < 1: the ascent pass (and the returned loss, logits) sees only the first f of x (of each
    process's share under DDP); the descent pass sees all of x.

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
    ascent = (
        opt.ascent_pass() if hasattr(opt, "ascent_pass") else contextlib.nullcontext()
    )  # structure=tensor
    k = max(1, round(ascent_fraction * len(y)))  # eps only needs a direction: a sub-batch gives one
    sparse = ssam.sparse_ascent(model, opt) if sparse_ascent else contextlib.nullcontext()  # dX = dY (W ⊙ M)
    with model.no_sync() if ddp and not sync_ascent else contextlib.nullcontext(), ascent, sparse:
        with autocast:
            out = model(x[:k])
            loss = F.cross_entropy(out, y[:k])
        (loss if scaler is None else scaler.scale(loss)).backward()
    opt.first_step(zero_grad=True)  # w <- w + eps (SSAM-D may draw a new mask in here)
    try:
        with ssam.frozen_bn_stats(model):  # BN running statistics follow the first pass only
            with autocast:
                loss2 = F.cross_entropy(model(x), y)
            (loss2 if scaler is None else scaler.scale(loss2)).backward()
    except BaseException:  # Ctrl-C, OOM...: never leave (or checkpoint) w + eps
        opt.restore()
        raise
    if scaler is not None:
        scaler.unscale_(opt.base_optimizer)
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not torch.isfinite(torch.stack([gr.norm() for gr in grads]).sum()):
            opt.zero_grad(set_to_none=True)  # skipped step: second_step below only restores w
    opt.second_step(zero_grad=True)  # w back exactly, then SGD with the gradient at w + eps
    if scaler is not None:
        scaler.update()
    return loss.detach(), out.detach()


def broadcast_masks(opt):
    """Make every process's SSAM masks rank 0's. bool tensors travel as one flat uint8 tensor (gloo has no bool)."""
    masks = [
        opt.state[p]["mask"] for g in opt.param_groups for p in g["params"] if "mask" in opt.state.get(p, {})
    ]
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
    return torch.stack(
        [t.detach().double().sum() for t in ts] + [t.detach().double().abs().sum() for t in ts]
    )


# -----------------------------------------------------------------------------------------------------------
# Checkpoints: written atomically every epoch; --resume restores everything, so the run continues bit-exactly.
# -----------------------------------------------------------------------------------------------------------
def save_checkpoint(path, **state):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(
        tmp, path
    )  # atomic: a crash leaves either the old checkpoint or the new one, never half of one


def config_diff(saved, cfg):
    """Keys (other than where and how a run is stored or resumed) whose values differ, as 'k=saved (now x)'."""
    return [
        f"{k}={saved.get(k)!r} (now {cfg.get(k)!r})"
        for k in sorted(set(saved) | set(cfg))
        if k not in RESUME_FREE and saved.get(k) != cfg.get(k)
    ]


def load_checkpoint(path, cfg):
    if not path.exists():
        raise SystemExit(f"--resume: no checkpoint at {path}; drop --resume to start from scratch")
    try:
        ck = torch.load(
            path, map_location="cpu", weights_only=False
        )  # our own file: it holds generator states
        saved = ck["config"]
    except Exception as e:
        raise SystemExit(
            f"--resume: {path} is unreadable or not a train.py checkpoint ({type(e).__name__}: {e}). "
            f"Delete it (or the run folder) to start over, or pass --fresh"
        ) from None
    diff = config_diff(saved, cfg)
    if diff:
        raise SystemExit(
            f"--resume: {path} was made with a different config: {', '.join(diff)}. Use the same "
            f"flags, another --out-dir, or --fresh to start over"
        )
    return ck


def read_log(path):
    """metrics.jsonl -> list of dicts. A cut last line (a kill or a full disk mid-write) is dropped."""
    lines = path.read_text().splitlines() if path.exists() else []
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise SystemExit(
                    f"{path}: line {i + 1} is not JSON ({line[:60]!r}): fix or delete that line"
                ) from None
            console.print(f"[yellow]warning:[/] {path}: dropped its cut last line {line[:60]!r}")
    return out


def write_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def out_dir_lock(out_dir):
    """One run writes an out-dir at a time. <out-dir>/lock holds the writer's "host pid" and is removed when the
    run ends (error or not). A lock left by a killed run (same host, pid not alive) is stale and taken over; one
    from another host cannot be checked and refuses the run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock, host = out_dir / "lock", socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                other_host, _, pid = lock.read_text().partition(" ")
            except FileNotFoundError:  # released in between: try again
                continue
            if other_host == host and pid.isdigit() and not pid_alive(int(pid)):
                console.print(
                    f"[yellow]note:[/] removing the stale lock {lock} of process {pid} (no longer running)"
                )
                lock.unlink(missing_ok=True)
                continue
            who = f"process {pid} on {other_host}" if pid.isdigit() else "a run that is just starting"
            raise SystemExit(
                f"{out_dir} is in use by another train.py run ({who}; {lock}): wait for it to end, pass "
                f"another --out-dir, or delete {lock} if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{host} {os.getpid()}")
        break
    else:
        raise SystemExit(
            f"could not take the lock {lock}: another run keeps taking it; pass another --out-dir"
        )
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


# -----------------------------------------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------------------------------------
def setup_distributed(cfg):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    dev = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {dev}: no CUDA device here; pass --device cpu")
    if cfg["compile"] and not dev.startswith("cuda") and not shutil.which(os.environ.get("CXX", "g++")):
        raise SystemExit(
            f"--compile on the CPU needs a C++ compiler ({os.environ.get('CXX', 'g++')}, or set CXX); "
            f"install one or drop --compile"
        )
    if "RANK" not in os.environ:
        return torch.device(dev), 0, 1
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if ":" in dev:
        raise SystemExit(
            f"--device {dev}: under torchrun each process uses cuda:<LOCAL_RANK>; pass --device cuda"
        )
    cuda = dev.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cfg["batch_size"] % world:
        raise SystemExit(f"--batch-size {cfg['batch_size']} must be divisible by the {world} processes")
    return torch.device(f"cuda:{local}" if cuda else "cpu"), rank, world


def train(cfg, show_config=True):
    """Train one run described by cfg (see resolve_config); returns the final metrics dict (rank 0)."""
    device, rank, world = setup_distributed(cfg)
    master = rank == 0
    out_dir = Path(cfg["out_dir"])
    ckpt_path, final_path = out_dir / "ckpt.pt", out_dir / "final.json"
    if master and show_config:
        table = Table(
            "key", "value", title=f"config ({world} process{'es' if world > 1 else ''} on {device})"
        )
        for k, v in cfg.items():
            table.add_row(k, str(v))
        console.print(table)
    if ckpt_path.exists() and not cfg["resume"] and not cfg["fresh"]:
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue that run, or --fresh to start over")
    if cfg["resume"] and final_path.exists():  # a finished run: say so and change nothing
        with contextlib.suppress(ValueError):  # (an unreadable final.json is remade below)
            done = json.loads(final_path.read_text())
            diff = config_diff(done["config"], cfg)
            if diff:
                raise SystemExit(
                    f"--resume: {final_path} was made with a different config: {', '.join(diff)}. "
                    f"Use the same flags, another --out-dir, or --fresh to start over"
                )
            if master:
                console.print(
                    f"{out_dir} is finished ({done['epochs']} epochs, test accuracy {done['test_acc']:.4f} "
                    f"in {final_path}): nothing to do. Pass --fresh instead of --resume to train it again"
                )
            return done
    with out_dir_lock(out_dir) if master else contextlib.nullcontext():
        if master and cfg["fresh"]:  # start over: nothing of an earlier run may be mixed in
            for f in ("ckpt.pt", "metrics.jsonl", "final.json"):
                (out_dir / f).unlink(missing_ok=True)
        return _train(cfg, device, rank, world)


class Diverged(SystemExit):
    """The training loss or the weights are not finite: the run stops (exit status 1) without a checkpoint."""


def _train(cfg, device, rank, world):
    master = rank == 0
    out_dir = Path(cfg["out_dir"])
    ckpt_path, log_path = out_dir / "ckpt.pt", out_dir / "metrics.jsonl"
    torch.manual_seed(cfg["seed"])

    # data, model, optimizer, schedule
    imagenet = cfg["dataset"] == "imagenet"
    data = (ImageNetLoader if imagenet else CifarOnDevice)(cfg, device, rank, world)
    if cfg["optimizer"] == "ssamf" and cfg["num_samples"] > data.num_train:
        raise SystemExit(
            f"--num-samples {cfg['num_samples']}: must be at most the {data.num_train} training images"
        )
    steps_per_epoch, total_steps = data.steps_per_epoch, cfg["epochs"] * data.steps_per_epoch
    raw_model = make_model(cfg["model"], data.num_classes, small_images=not imagenet).to(device)
    if cfg["channels_last"]:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    model = raw_model
    if cfg.get("sparse_ascent") and cfg["compile"]:
        raise SystemExit(
            "--sparse-ascent with --compile: torch.compile hides the nn.Linear layers it patches; drop one"
        )
    if cfg.get("sparse_ascent") and not any(
        isinstance(m, nn.Linear) and m.out_features % 4 == 0 for m in raw_model.modules()
    ):
        raise SystemExit(
            f"--sparse-ascent: --model {cfg['model']} has no nn.Linear with a multiple of 4 outputs, so no 2:4 "
            "mask fits a layer it could change; drop --sparse-ascent"
        )
    if world > 1:  # tensor masks / SAM-ON skip tensors in a synchronized ascent pass: DDP must be told
        unused = cfg.get("sync_ascent", False) and (
            cfg["optimizer"] == "samon" or cfg.get("structure") == "tensor"
        )
        model = nn.parallel.DistributedDataParallel(
            raw_model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused,
        )
    if cfg["compile"]:
        model = torch.compile(model)
    opt = make_optimizer(cfg, raw_model, steps_per_epoch)
    # on SAM's base optimizer: the same param_groups, and no warning that opt.step() is never called
    sched = torch.optim.lr_scheduler.LambdaLR(
        getattr(opt, "base_optimizer", opt), lambda t: 0.5 * (1 + math.cos(math.pi * t / total_steps))
    )
    autocast = torch.autocast(
        device.type,
        dtype=torch.bfloat16 if cfg["amp"] == "bf16" else torch.float16,
        enabled=cfg["amp"] != "none",
    )
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
        # keep only the epochs the checkpoint has (a crash between log line and checkpoint would repeat one)
        lines = read_log(log_path) if cfg["resume"] else []
        write_atomic(log_path, "".join(json.dumps(l) + "\n" for l in lines if l["epoch"] <= start_epoch))
        (out_dir / "final.json").unlink(
            missing_ok=True
        )  # only a finished run has one (scripts/reproduce.py skips those)

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

    fp16 = cfg["amp"] == "fp16"

    def stop_if_diverged(epoch, step, bad_steps, end_of_epoch):
        """Ends the run (Diverged, exit status 1) before anything is written if the loss was not finite at some
        step (fp16: at every step of the epoch, since GradScaler skips a step whose loss overflowed and lowers its
        scale) or, at the end of the epoch, a weight or BN statistic is not finite. bad_steps counts the steps with
        a non-finite loss; summed over the processes so that all of them stop together. One host sync."""
        bad = bad_steps.clone()
        if world > 1:
            dist.all_reduce(bad)
        limit = (world * steps_per_epoch - 1 if end_of_epoch else math.inf) if fp16 else 0
        flags = [bad > limit]
        if end_of_epoch:
            flags += [
                ~torch.isfinite(t).all() for t in raw_model.state_dict().values() if t.is_floating_point()
            ]
        if not torch.stack(flags).any().item():
            return
        what = (
            "the loss is NaN or inf" if flags[0].item() else "a weight or BatchNorm statistic is NaN or inf"
        )
        kept = (
            f"{ckpt_path} (epoch {epoch}) is kept as the last good checkpoint"
            if epoch
            else "no checkpoint was written"
        )  # a checkpoint is written after every good epoch
        raise Diverged(
            f"training diverged in epoch {epoch + 1} (by step {step + 1} of {steps_per_epoch}): {what} "
            f"(--lr {cfg['lr']:g}, now {sched.get_last_lr()[0]:.3g}). Stopped: {kept}, no final.json. "
            f"Lower --lr" + (" or --rho" if "rho" in cfg else "")
        )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not master,
        transient=False,
    )
    epoch_log, test_acc = None, float("nan")
    with progress:
        for epoch in range(start_epoch, cfg["epochs"]):
            model.train()
            task = progress.add_task(f"epoch {epoch + 1}/{cfg['epochs']}", total=steps_per_epoch, metrics="")
            loss_sum, loss_seen, bad_steps, correct, seen = (torch.zeros((), device=device) for _ in range(5))
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
                loss, out = train_step(
                    model,
                    opt,
                    x,
                    y,
                    autocast,
                    scaler,
                    cfg.get("sync_ascent", False),
                    cfg.get("sparse_ascent", False),
                    cfg.get("ascent_fraction", 1.0),
                )
                if cfg["optimizer"] == "ssamd" and opt.last_mask_update != mask_step:
                    masks_updated += 1  # SSAM-D drew a new mask in first_step, from this process's gradient
                    if world > 1:
                        broadcast_masks(opt)
                sched.step()
                finite = torch.isfinite(loss)  # counted on the device: no sync per step
                bad_steps += ~finite
                loss_sum += torch.where(
                    finite, loss * len(out), 0.0
                )  # out: the unperturbed pass (--ascent-fraction of y)
                loss_seen += finite * len(out)
                correct += (out.argmax(1) == y[: len(out)]).sum()
                seen += len(out)
                if step % 10 == 0 or step == steps_per_epoch - 1:  # .item() syncs: not every step
                    stop_if_diverged(epoch, step, bad_steps, end_of_epoch=False)
                    if master:
                        progress.update(
                            task,
                            completed=step + 1,
                            metrics=f"loss {(loss_sum / loss_seen).item():.3f}"
                            f" acc {(correct / seen).item():.3f} lr {sched.get_last_lr()[0]:.4f}",
                        )
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_time = time.perf_counter() - t0
            stop_if_diverged(epoch, steps_per_epoch - 1, bad_steps, end_of_epoch=True)
            if world > 1:
                for t in (loss_sum, loss_seen, bad_steps, correct, seen):
                    dist.all_reduce(t)
            last = epoch + 1 == cfg["epochs"]
            test_acc = evaluate() if last or (epoch + 1) % cfg.get("eval_every", 1) == 0 else None
            elapsed += time.perf_counter() - t0
            epoch_log = dict(
                epoch=epoch + 1,
                loss=(loss_sum / loss_seen).item(),
                acc=(correct / seen).item(),
                test_acc=test_acc,
                lr=sched.get_last_lr()[0],
                time=train_time,
                step_ms=1000 * train_time / steps_per_epoch,
                data_share=data_time / train_time,
                density=opt.density() if sparse else 1.0,
                masks_updated=masks_updated,
                nonfinite_loss_steps=int(bad_steps.item()),
            )  # fp16: steps GradScaler skipped
            if world > 1:  # all processes must hold the same weights and masks, or something is broken
                mine = fingerprint(raw_model, opt)
                fps = [torch.zeros_like(mine) for _ in range(world)]
                dist.all_gather(fps, mine)
                epoch_log["ranks_in_sync"] = all(torch.equal(fps[0], f) for f in fps)
                if not epoch_log["ranks_in_sync"]:
                    raise RuntimeError(f"processes diverged at epoch {epoch + 1}: weights or masks differ")
            progress.update(
                task,
                metrics=f"loss {epoch_log['loss']:.3f} acc {epoch_log['acc']:.3f} "
                + (f"test {test_acc:.3f}" if test_acc is not None else "")
                + (f" density {epoch_log['density']:.3f}" if sparse else ""),
            )
            if master:
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(epoch_log) + "\n")
                save_checkpoint(
                    ckpt_path,
                    config=cfg,
                    epoch=epoch + 1,
                    elapsed=elapsed,
                    model=raw_model.state_dict(),
                    optimizer=opt.state_dict(),
                    scheduler=sched.state_dict(),
                    scaler=scaler.state_dict() if scaler is not None else None,
                    data_rng=g.get_state(),
                    torch_rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                )

    if (
        epoch_log is None
    ):  # resumed after the last checkpoint but before final.json: nothing to train, just measure
        test_acc = evaluate()
    # train accuracy and ms/step over every epoch of the run (a resumed run's log holds the earlier ones too)
    history = read_log(log_path) if master else [epoch_log] if epoch_log else []
    result = dict(
        config=cfg,
        test_acc=test_acc,
        train_acc=history[-1]["acc"] if history else None,
        epochs=cfg["epochs"],
        time_s=elapsed,
        step_ms=float(np.median([h["step_ms"] for h in history])) if history else None,
        density=opt.density() if sparse else 1.0,
        processes=world,
        device=str(device),
        torch=torch.__version__,
    )
    if master:
        write_atomic(out_dir / "final.json", json.dumps(result, indent=2) + "\n")
        console.print(
            f"[bold]{cfg['name']}[/]: test accuracy {test_acc:.4f}, {result['step_ms'] or 0:.0f} ms/step, "
            f"{elapsed:.0f} s -> {out_dir / 'final.json'}"
        )
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
    recipe = resolve_config(
        get_args(base + (["--sparsity", str(cfg["sparsity"])] if "sparsity" in cfg else []))
    )
    differ = [k for k in cfg if k not in RESUME_FREE and cfg[k] != recipe.get(k)]
    cfg["name"] = recipe["name"] + "".join(
        f"-{k.replace('_', '-')}" + ("" if cfg[k] is True else str(cfg[k]).replace(":", "of")) for k in differ
    )
    cfg["out_dir"] = str(Path(root) / cfg["name"])
    return cfg, not differ


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
            raise SystemExit(
                f"{cfg['out_dir']} holds a run of another config ({st[7:]}): move it away, or pass "
                f"--fresh to train it again with the config asked for"
            )
        st = "todo" if fresh else st
        console.print(
            f"[{len(plan) + 1}/{len(grid)}] {st:6} {cfg['name']}" + ("" if recipe else "  (not the recipe)"),
            soft_wrap=True,
        )
        plan.append((flags, cfg, st))
    running = []

    def wait(until):  # reap finished subprocesses until len(running) <= until
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
                    raise SystemExit(
                        f"{tail}\ntrain.py failed (exit {proc.returncode}) for {c['name']}: fix it "
                        f"and rerun (finished runs are kept)"
                    )
                console.print(f"finished {c['name']}", soft_wrap=True)

    for i, (flags, cfg, st) in enumerate(plan):
        if dry_run or st == "done":
            continue
        cfg["resume"], cfg["fresh"] = st == "resume", st != "resume"
        if launch is None:
            console.rule(f"[bold]{cfg['name']}")
            train(cfg, show_config=i == 0)
            continue
        cmd = list(launch) + [
            str(ROOT / "train.py"),
            *flags,
            "--name",
            cfg["name"],
            "--out-dir",
            cfg["out_dir"],
            "--resume" if cfg["resume"] else "--fresh",
        ]
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
    from lab import sharpness  # Lanczos on Hessian-vector products

    args, t0 = get_args(argv), time.perf_counter()
    for k in ("optimizer", "name", "resume"):  # a flag the demo would ignore is an error, as in train()
        if getattr(args, k) not in (None, False):
            raise SystemExit(
                f"--demo trains sgd, sam, ssamf and ssamd in runs of its own, and reuses finished ones: "
                f"drop --{k}"
            )
    keep, skip = [], 0
    for a in argv:  # the runner names the runs: drop the flags it sets
        if skip:
            skip -= 1
        elif a in ("--out-dir", "--name", "--optimizer"):
            skip = 1
        elif a not in ("--demo", "--fresh", "--resume") and not a.startswith(
            ("--out-dir=", "--name=", "--optimizer=")
        ):
            keep.append(a)
    if args.eval_every is None:  # 10,000 test images: measure once, at the end
        keep += ["--eval-every", str(args.epochs or PRESETS[args.preset][2])]
    root = args.out_dir or ROOT / "runs" / "demo"

    def flags_for(o):  # an optimizer flag goes only to the optimizers that read it
        out, i = [], 0
        while i < len(keep):
            k = keep[i].removeprefix("--").split("=")[0].replace("-", "_")
            n = 1 + (i + 1 < len(keep) and "=" not in keep[i] and not keep[i + 1].startswith("--"))
            out += keep[i : i + n] if k not in USED_BY or o in USED_BY[k] else []
            i += n
        return out + ["--optimizer", o]

    runs = run_grid([flags_for(o) for o in ("sgd", "sam", "ssamf", "ssamd")], root, fresh=args.fresh)
    rows = []
    for cfg, r in runs:
        t1 = time.perf_counter()
        model, _ = sharpness.load_run(Path(cfg["out_dir"]) / "ckpt.pt", "cpu")
        x, y = sharpness.train_batch(cfg, min(128, cfg.get("train_size") or 128), "cpu")
        lam = sharpness.top_eigenvalues(model, x, y, k=1, iters=DEMO_HVPS)[0]
        rows.append((cfg, r, lam, time.perf_counter() - t1))
    sgd_ms, c0 = rows[0][1]["step_ms"], rows[0][0]
    n_test = len(load_cifar(c0)[3]) if c0["dataset"] != "imagenet" else "?"
    table = Table(
        "optimizer",
        "sparsity",
        "test acc",
        "ms/step",
        "x SGD",
        "mask density",
        "Hessian lambda_1",
        title=f"{c0['preset']}: {c0['model']}, {c0['epochs']} epochs, {n_test} test images, "
        f"{rows[0][1]['device']}, total {time.perf_counter() - t0:.0f} s",
    )
    for cfg, r, lam, _ in rows:
        table.add_row(
            cfg["optimizer"],
            f"{cfg.get('sparsity', '-')}",
            f"{100 * r['test_acc']:.1f}%",
            f"{r['step_ms']:.0f}",
            f"{r['step_ms'] / sgd_ms:.2f}",
            f"{r['density']:.3f}",
            f"{lam:.0f}",
        )
    Console().print(table)
    Console().print(
        f"lambda_1: top eigenvalue of the training-loss Hessian on 128 training images ({DEMO_HVPS} "
        f"Lanczos steps, {sum(r[3] for r in rows):.0f} s for all four): lower = flatter minimum, what "
        "SAM is for. One seed after a few epochs; the converged comparison (seeds, confidence intervals) "
        "is `make bench-accuracy` -> bench/results/accuracy.md."
    )


DEMO_HVPS = (
    10  # lambda_1 agreed with 20 and 40 steps to 3 digits on a wrn10-1 checkpoint (bench/sharpness.py)
)


if __name__ == "__main__":
    args = get_args()
    if args.demo:
        demo(sys.argv[1:])
    else:
        train(resolve_config(args))
    if dist.is_initialized():
        dist.destroy_process_group()
