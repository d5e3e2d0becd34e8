"""Data for train.py: the table of datasets (DATASETS), the shipped CIFAR-10 subset, CIFAR-10/100
(torchvision files or an ImageFolder tree, decoded once and cached), ImageNet (ImageFolder + DataLoader
workers), and CIFAR's augmentation on the device."""

import functools
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from lab.runs import console, write_atomic

ROOT = Path(__file__).resolve().parent.parent  # the repository
CIFAR_MEAN, CIFAR_STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)  # per channel, 0..255 pixel units
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load(c, device, rank, world):
    """The run's data (c: its Config): CIFAR on the device (CifarOnDevice) or ImageNet through DataLoader
    workers."""
    return DATASETS[c.dataset]["loader"](c, device, rank, world)


# -----------------------------------------------------------------------------------------------------------
# Reading images: the one reader (Pillow, as torchvision's ImageFolder); an unreadable file names itself
# -----------------------------------------------------------------------------------------------------------
class UnreadableImage(RuntimeError):
    """A RuntimeError, so that one raised in a DataLoader worker is re-raised by the main process."""


def read_image(path):
    """An image file (a path or a file object) -> a PIL image in RGB."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError, "image file is truncated", ...
        raise UnreadableImage(
            f"{path}: not a readable image ({type(e).__name__}: {e}); delete or replace it"
        ) from None


def to_uint8(images):
    """PIL images of one size -> (N, 3, H, W) uint8."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


# -----------------------------------------------------------------------------------------------------------
# CIFAR: the shipped subset, torchvision's files or an ImageFolder tree, decoded once into uint8 tensors
# -----------------------------------------------------------------------------------------------------------


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
        x = to_uint8([read_image(io.BytesIO(buf[off[i] : off[i + 1]])) for i in range(len(off) - 1)])
        out += [x, torch.from_numpy(z[f"{split}_labels"].astype(np.int64))]
    return out


def cache_dir(c):
    """Where decoded ImageFolder trees are cached: outside the source tree, in the user's cache directory."""
    d = c.cache_dir or os.environ.get("SSAM_CACHE_DIR")
    if not d:
        d = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssam"
    return Path(d).expanduser()


def load_image_folder_tensor(root, cache_root):
    """<root>/{train,test}/<class>/*.jpg -> [train_x, train_y, test_x, test_y], decoded once and cached in
    cache_root. The cache key covers every file's path (so its class), size and mtime: any change
    re-decodes."""
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
        return torch.load(cache, weights_only=True)
    out = []
    with console.status(
        f"decoding {len(files['train']) + len(files['test'])} images from {root} (once; cached in {cache})"
    ):
        for s in ("train", "test"):
            try:
                imgs = [read_image(f) for f in files[s]]
            except UnreadableImage as e:
                raise SystemExit(str(e)) from None
            for f, im in zip(files[s], imgs):
                if im.size != imgs[0].size:
                    raise SystemExit(
                        f"{f}: image is {im.size[0]}x{im.size[1]}, but {files[s][0]} is "
                        f"{imgs[0].size[0]}x{imgs[0].size[1]}: all images must have one size"
                    )
            x = to_uint8(imgs)
            y = torch.tensor([classes.index(f.parent.name) for f in files[s]])
            out += [x, y]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, out)
    except OSError as e:  # read-only home, full disk: the decoded tensors are still good
        console.print(
            f"[yellow]warning:[/] could not write the decoded cache {cache} ({type(e).__name__}: {e}); "
            f"training from memory. Pass --cache-dir (or set SSAM_CACHE_DIR) to a writable folder "
            f"to decode only once"
        )
    return out


def load_cifar(c):
    """-> train_x, train_y, test_x, test_y: uint8 (N, 3, 32, 32) and int64 (N,), on the CPU."""
    name, num_classes = c.dataset, DATASETS[c.dataset]["classes"]
    if name == "cifar10-subset":
        return load_subset()
    root = Path(c.data_dir or ROOT / "data" / name)
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
        return load_image_folder_tensor(root, cache_dir(c))
    if c.cache_dir:
        raise SystemExit(
            f"--cache-dir would be ignored: {root} is not an ImageFolder tree (torchvision's {name} files "
            "are read directly, never cached). Drop --cache-dir"
        )
    cls = getattr(torchvision.datasets, DATASETS[name]["torchvision"])
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


# -----------------------------------------------------------------------------------------------------------
# CIFAR on the device: the data sits there as one uint8 tensor; whole batches are augmented there
# -----------------------------------------------------------------------------------------------------------
def augment(x, g, cutout=16, pad=4):
    """Random crop (zero padding `pad`), horizontal flip, normalization, Cutout (p=0.5) on a whole uint8
    batch. All random numbers come from the CPU generator `g`, so the result is the same on any device and a
    resumed run draws exactly what the straight run drew."""
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
    # Cutout [DeVries & Taylor]: zero (= the mean, after normalization) a square around a random center
    if cutout > 0:
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


def noisy_labels(y, p, num_classes, seed=0):
    """A fixed fraction p of the labels replaced by a different class, uniformly; drawn from `seed`
    (--data-seed, not --seed), so every run of a comparison sees the same noisy training set."""
    if not 0 <= p < 1:
        raise SystemExit(f"--label-noise {p} must be in [0, 1)")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[: round(p * len(y))]
    y = y.clone()
    y[idx] = (y[idx] + torch.randint(1, num_classes, (len(idx),), generator=g)) % num_classes
    return y


class CifarOnDevice:
    """Train/test tensors on the device; batches(g) yields this process's share of each global batch."""

    def __init__(self, c, device, rank, world):
        train_x, train_y, test_x, test_y = load_cifar(c)
        if c.train_size > len(train_y):
            raise SystemExit(
                f"--train-size {c.train_size}: must be at most the {len(train_y)} training images "
                f"of {c.dataset} (or 0 for all)"
            )
        if c.train_size:
            g = torch.Generator().manual_seed(c.data_seed)
            keep = torch.randperm(len(train_y), generator=g)[: c.train_size].sort().values
            train_x, train_y = train_x[keep], train_y[keep]
        self.num_classes = DATASETS[c.dataset]["classes"]
        if c.label_noise:  # symmetric noise: exactly round(p*N) images get one of the other labels
            train_y = noisy_labels(train_y, c.label_noise, self.num_classes, c.data_seed)
        self.train_x, self.train_y = train_x.to(device), train_y.to(device)
        self.test_x, self.test_y = test_x[rank::world].to(device), test_y[rank::world].to(device)
        self.batch, self.cutout, self.rank, self.world = c.batch_size, c.cutout, rank, world
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
        """n random augmented training images for SSAM-F's Fisher estimate (not split: each process uses
        all n)."""
        idx = torch.randperm(len(self.train_y), generator=g)[:n].to(self.train_y.device)
        x, y = augment(self.train_x[idx], g, self.cutout), self.train_y[idx]
        return [(x[i : i + self.batch], y[i : i + self.batch]) for i in range(0, n, self.batch)]

    def test_batches(self):
        for i in range(0, len(self.test_y), 1000):
            yield normalize(self.test_x[i : i + 1000]), self.test_y[i : i + 1000]


# -----------------------------------------------------------------------------------------------------------
# ImageNet: an ImageFolder tree read by DataLoader workers
# -----------------------------------------------------------------------------------------------------------
class ImageNetLoader:
    """ImageNet from an ImageFolder tree with DataLoader workers (too big to sit on the device)."""

    def __init__(self, c, device, rank, world):
        T = torchvision.transforms
        root = Path(c.data_dir or ROOT / "data" / "imagenet")
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
            str(root / "train"), self.train_tf, loader=read_image
        )
        test_ds = torchvision.datasets.ImageFolder(str(root / "val"), test_tf, loader=read_image)
        if test_ds.classes != self.train_ds.classes:
            raise SystemExit(f"ImageNet: {root}/val has different class folders than {root}/train")
        self.num_classes = len(self.train_ds.classes)
        self.local_batch, self.device, self.workers = c.batch_size // world, device, c.workers
        # DistributedSampler with world=1 too: the order depends only on (seed, epoch): resume gets it right.
        self.sampler = torch.utils.data.DistributedSampler(
            self.train_ds, world, rank, seed=c.seed, drop_last=True
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
                f"--batch-size {c.batch_size} is larger than the {len(self.train_ds)} training images"
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
# The datasets: train.py's --dataset choices, and the flags each one ignores (given, they are an error)
# -----------------------------------------------------------------------------------------------------------
MINE = (
    "--dataset cifar10-subset is the subset shipped in data/; to train on a tree of your own, pass "
    "--dataset cifar10 or cifar100 (or a --preset cifar10-*/cifar100-*)"
)
ON_DEVICE = "CIFAR sits on the device as one tensor; there are no DataLoader workers"
RESIZED = "ImageNet uses RandomResizedCrop + flip and the whole train/ folder"
DATASETS = {
    # name: classes, image side (32: the models' CIFAR stem), loader, torchvision class, ignored flags
    "cifar10-subset": dict(
        classes=10,
        side=32,
        loader=CifarOnDevice,
        ignores=dict(data_dir=MINE, cache_dir=MINE, workers=ON_DEVICE),
    ),
    "cifar10": dict(
        classes=10, side=32, loader=CifarOnDevice, torchvision="CIFAR10", ignores=dict(workers=ON_DEVICE)
    ),
    "cifar100": dict(
        classes=100, side=32, loader=CifarOnDevice, torchvision="CIFAR100", ignores=dict(workers=ON_DEVICE)
    ),
    "imagenet": dict(
        classes=1000,
        side=224,
        loader=ImageNetLoader,
        ignores=dict(
            cutout=RESIZED,
            train_size=RESIZED,
            label_noise=RESIZED,
            data_seed=RESIZED,
            cache_dir="ImageNet is read by DataLoader workers, never cached",
        ),
    ),
}
