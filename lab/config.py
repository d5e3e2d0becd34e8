"""The one config of train.py: the Config dataclass (each field is a flag, --name_with_dashes, its help text
beside it), the paper's recipes as presets, the command line (get_args -> resolve_config) and the one check
of a config (check). A run's Config is saved whole (dataclasses.asdict) in its checkpoint and final.json and
read back with Config(**d) (load_config)."""

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from lab.data import DATASETS, ROOT
from lab.methods import OPTIMIZERS, SAM_TYPES, SPARSE

MOMENTUM = 0.9  # SGD momentum of every preset (§5.1); with a cosine LR and crop+flip (+Cutout 16x16 on CIFAR)

# The paper's recipes (§5.1): overrides of Config's defaults. wd_sam: the weight decay of the SAM-type
# optimizers (SAM/SSAM use 1e-3 on CIFAR [14]; WD_SAM when a preset does not say).
WD_SAM = 1e-3
PRESETS = {
    "cifar10-subset": dict(),  # Config's defaults: wrn10-1 on the 5,000 images in data/ (the demo's)
    "cifar10-resnet18": dict(dataset="cifar10", model="resnet18", epochs=200, batch_size=128),  # Table 1
    "cifar100-resnet18": dict(dataset="cifar100", model="resnet18", epochs=200, batch_size=128, rho=0.2),
    "cifar10-wrn28-10": dict(dataset="cifar10", model="wrn28-10", epochs=200, batch_size=128),  # Table 2
    "cifar100-wrn28-10": dict(dataset="cifar100", model="wrn28-10", epochs=200, batch_size=128, rho=0.2),
    "imagenet-resnet50": dict(  # Table 3
        dataset="imagenet", model="resnet50", epochs=90, batch_size=256, lr=0.1, rho=0.07, weight_decay=1e-4
    )
    | dict(wd_sam=1e-4),
}
# wrn10-1 at batch 64 for the subset preset (2-core CPU, SGD): an epoch of the subset in 3.9 s, 42.8% test
# accuracy after 5 epochs (batch 128: 4.9 s, 37.6%); wrn16-1 reached 34% in 3 epochs of about the same time.


def setting(default, help):
    """A Config field and its --help text."""
    return field(default=default, metadata=dict(help=help))


@dataclass
class Config:
    """Every setting of a run. Defaults: the cifar10-subset preset; --preset P starts from PRESETS[P]."""

    preset: str = setting("cifar10-subset", f"recipe to start from: {', '.join(PRESETS)}")
    dataset: str = setting("cifar10-subset", " | ".join(DATASETS))
    model: str = setting("wrn10-1", "resnet18 | resnet50 | wrn<depth>-<width>, e.g. wrn28-10, wrn16-1")
    optimizer: str = setting("sgd", " | ".join(OPTIMIZERS) + " (samon: SAM on normalization layers only)")
    sparsity: float = setting(0.5, "SSAM: fraction of weights NOT perturbed (the paper: 0.5 to 0.99)")
    structure: str = setting(
        "unstructured",
        "SSAM mask: unstructured | 2:4 (needs sparsity 0.5) | tensor (whole tensors; skips their ascent "
        "weight gradient)",
    )
    mask_select: str = setting(
        "paper",
        "--structure tensor: paper (the tensors of highest mean score) | cost (most score per unit of "
        "ascent-pass cost, ssam.cost_tensor_masks)",
    )
    ascent_fraction: float = setting(
        1.0, "SAM-type: the ascent pass on the first f of each batch, the descent on all; 0 < f <= 1"
    )
    ascent_every: int = setting(
        1, "SAM-type: the ascent (two passes) every k steps, one pass and a plain base step between (SAM-k)"
    )
    looksam_alpha: float = setting(
        0.0,
        "LookSAM (Liu et al., CVPR 2022) with --ascent-every k > 1: between ascents descend with g + "
        "alpha·||g||/||g_v||·g_v per tensor, g_v the part of the last SAM gradient orthogonal to g (the "
        "paper: 0.7); 0 = SAM-k",
    )
    sparse_ascent: bool = setting(
        False,
        "ssamf/ssamd with --structure 2:4: nn.Linear input gradients of the ascent pass through W ⊙ M "
        "(ssam.sparse_ascent; 2:4 tensor cores on CUDA with --amp)",
    )
    update_interval: int = setting(0, "steps between SSAM mask updates; 0 = once an epoch (the authors')")
    num_samples: int = setting(128, "SSAM-F: training images for the Fisher estimate (N_F, Eq. 5)")
    drop_rate: float = setting(0.5, "SSAM-D: share of the mask dropped and regrown (alpha, Eq. 9)")
    adaptive: bool = setting(False, "SAM: adaptive (ASAM) perturbation")
    rho: float = setting(0.1, "SAM/SSAM perturbation radius")
    epochs: int = setting(6, "training epochs")
    batch_size: int = setting(64, "global batch, split over torchrun's processes")
    lr: float = setting(0.05, "peak learning rate; cosine decay to 0 over all steps")
    weight_decay: float = setting(5e-4, "default: the preset's wd for SGD, or for SAM/SSAM")
    cutout: int = setting(16, "Cutout square side on CIFAR, applied with p=0.5; 0 = off")
    train_size: int = setting(0, "CIFAR: train on a fixed random N-image part (0 = all; tests)")
    label_noise: float = setting(
        0.0, "CIFAR: give this fraction of the training images a wrong label, drawn once with a fixed seed"
    )
    data_seed: int = setting(
        0, "CIFAR: which images --train-size keeps and which labels --label-noise changes (0: the benches')"
    )
    seed: int = setting(0, "model init, data order, augmentation, SSAM-D growth")
    sync_ascent: bool = setting(
        False, "DDP: all-reduce the ascent gradient too (off: each process perturbs with its own batch's)"
    )
    amp: str = setting("none", "none | bf16 | fp16 (fp16 with a GradScaler)")
    channels_last: bool = setting(False, "channels-last memory format")
    fsdp: bool = setting(
        False,
        "under torchrun: FSDP2 instead of DDP, each process holds 1/N of the weights, gradients, SAM's "
        "weight copy, masks and momentum (needs --sync-ascent for SAM-type optimizers)",
    )
    # where and how the run is stored, resumed and seen (FREE: may change between a run and its --resume)
    compile: bool = setting(False, "torch.compile the model (the CPU needs a C compiler)")
    device: str | None = setting(None, "cuda | cpu | cuda:N (default: cuda if available)")
    workers: int = setting(8, "ImageNet DataLoader workers")
    eval_every: int = setting(1, "test accuracy every N epochs and after the last")
    data_dir: str | None = setting(
        None,
        "CIFAR: ImageFolder tree <dir>/{train,test}/<class>/*.jpg, or torchvision's download folder "
        "(default data/<dataset>); ImageNet: <dir>/{train,val}/<class>/*",
    )
    cache_dir: str | None = setting(
        None,
        "where an ImageFolder tree's decoded tensors are cached (default: $SSAM_CACHE_DIR, else "
        "$XDG_CACHE_HOME/ssam, else ~/.cache/ssam)",
    )
    name: str | None = setting(None, "run name (default: preset, optimizer, what differs, seed)")
    out_dir: str | None = setting(None, "default runs/<name>")
    resume: bool = setting(False, "continue from <out-dir>/ckpt.pt")
    fresh: bool = setting(False, "start over even if <out-dir> holds a checkpoint")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
FREE = "compile device workers eval_every data_dir cache_dir name out_dir resume fresh".split()
# The settings only some optimizers read: given with another optimizer, the flag is an error.
READ_BY = dict(
    rho=SAM_TYPES,
    sparsity=SPARSE,
    structure=SPARSE,
    mask_select=SPARSE,
    update_interval=SPARSE,
    num_samples=("ssamf",),
    drop_rate=("ssamd",),
    adaptive=("sam",),
    sparse_ascent=SPARSE,
    ascent_fraction=SAM_TYPES,
    ascent_every=SAM_TYPES,
    looksam_alpha=SAM_TYPES,
    sync_ascent=SAM_TYPES,
)
# (field, ok(value), what it must be): the number checks of check()
RANGES = [
    ("epochs", lambda v: v >= 1, "an integer >= 1"),
    ("batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("weight_decay", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("rho", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("cutout", lambda v: v >= 0, "0 (off) or a square side in pixels >= 1"),
    ("train_size", lambda v: v >= 0, "0 (all images) or a number of images >= 1"),
    ("label_noise", lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    ("seed", lambda v: v >= 0, "an integer >= 0"),
    ("data_seed", lambda v: v >= 0, "an integer >= 0"),
    ("sparsity", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    ("update_interval", lambda v: v >= 0, "0 (once an epoch) or a number of steps >= 1"),
    ("num_samples", lambda v: v >= 1, "an integer >= 1"),
    ("drop_rate", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    ("workers", lambda v: v >= 0, "an integer >= 0"),
    ("eval_every", lambda v: v >= 1, "an integer >= 1"),
    ("ascent_every", lambda v: v >= 1, "an integer >= 1"),
    ("looksam_alpha", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
]
CHOICES = dict(  # the settings that take one of a few words
    optimizer=OPTIMIZERS,
    dataset=tuple(DATASETS),
    structure=("unstructured", "2:4", "tensor"),
    mask_select=("paper", "cost"),
    amp=("none", "bf16", "fp16"),
)


def flag(key):
    return "--" + key.replace("_", "-")


# -----------------------------------------------------------------------------------------------------------
# The command line: one flag per Config field, each defaulting to None, so that a flag the user gave can be
# told from a default (a given flag that the run would ignore is an error)
# -----------------------------------------------------------------------------------------------------------
def get_args(argv=None, description=None, demo=None):
    """argv -> argparse.Namespace; demo: the help of a --demo flag (train.py's), None: no such flag."""
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if demo:
        ap.add_argument("--demo", action="store_true", help=demo)
    for k, f in FIELDS.items():
        default = "" if f.default is None else f" (default: {f.default})"
        if any(k in recipe for recipe in PRESETS.values()):
            default = " (default: the preset's)"
        if f.type is bool:
            ap.add_argument(flag(k), action="store_true", default=None, help=f.metadata["help"])
        else:
            kind = f.type if f.type in (int, float) else None
            ap.add_argument(flag(k), type=kind, help=f.metadata["help"] + default)
    args = ap.parse_args(argv)
    if args.preset is not None and args.preset not in PRESETS:
        raise SystemExit(f"unknown --preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    return args


def from_preset(preset, given):
    """The preset's recipe with the settings `given` (a dict); SAM-type optimizers get the preset's wd_sam."""
    recipe = dict(PRESETS[preset])
    wd_sam = recipe.pop("wd_sam", WD_SAM)
    c = Config(**{**recipe, "preset": preset, **given})
    if "weight_decay" not in given and c.optimizer in SAM_TYPES:
        c.weight_decay = wd_sam
    return c


def resolve_config(args):
    """The run's Config from the flags given (get_args). A bad value, or a flag the run would ignore, is a
    one-line SystemExit saying what to pass."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in FIELDS}
    if "optimizer" in given:
        given["optimizer"] = given["optimizer"].lower()
    c = from_preset(given.pop("preset", Config.preset), given)
    check(c, given)
    c.name = c.name or run_name(c)
    c.out_dir = c.out_dir or str(ROOT / "runs" / c.name)
    return c


# -----------------------------------------------------------------------------------------------------------
# The one check of a config: words, numbers, combinations, flags the run would ignore
# -----------------------------------------------------------------------------------------------------------
def check(c, given=()):
    """SystemExit naming the first bad setting of c; `given`: the flags the user gave."""
    for k, allowed in CHOICES.items():
        if getattr(c, k) not in allowed:
            words = ", ".join(allowed[:-1]) + " or " + allowed[-1]
            raise SystemExit(f"unknown {flag(k)} {getattr(c, k)!r}: choose {words}")
    sparse = c.optimizer in SPARSE
    if c.structure == "2:4" and c.sparsity != 0.5 and sparse:
        raise SystemExit(
            f"--structure 2:4 perturbs 2 of every 4 weights: it needs --sparsity 0.5, not {c.sparsity}"
        )
    if c.sparse_ascent and not (sparse and c.structure == "2:4"):
        raise SystemExit(
            f"--sparse-ascent needs --optimizer ssamf or ssamd with --structure 2:4, not --optimizer "
            f"{c.optimizer} --structure {c.structure}: it multiplies by the 2:4-masked weight"
        )
    if not 0 < c.ascent_fraction <= 1:
        raise SystemExit(
            f"--ascent-fraction {c.ascent_fraction} is not in (0, 1]: the share of the batch the first pass "
            "sees"
        )
    if c.looksam_alpha and c.ascent_every == 1:
        raise SystemExit(
            f"--looksam-alpha {c.looksam_alpha} needs --ascent-every k > 1: with an ascent every step there "
            "is no step between ascents to reuse g_v on"
        )
    if c.fsdp:
        check_fsdp(c)
    if c.mask_select == "cost" and (c.structure != "tensor" or not sparse):
        raise SystemExit(
            "--mask-select cost picks whole tensors: it needs --optimizer ssamf or ssamd and --structure "
            "tensor"
        )
    for k, ok, allowed in RANGES:
        if not ok(getattr(c, k)):
            raise SystemExit(f"{flag(k)} {getattr(c, k)!r}: must be {allowed}")
    if c.resume and c.fresh:
        raise SystemExit("--resume and --fresh contradict each other: pass one of them")
    ignored = [
        (k, f"it is used by --optimizer {' / '.join(READ_BY[k])} only, not {c.optimizer}")
        for k in READ_BY
        if k in given and c.optimizer not in READ_BY[k]
    ]
    ignored += [(k, why) for k, why in DATASETS[c.dataset]["ignores"].items() if k in given]
    if "data_seed" in given and not (c.train_size or c.label_noise):
        ignored += [("data_seed", "it picks the --train-size part and the --label-noise draw; neither is on")]
    if ignored:
        k, why = ignored[0]
        raise SystemExit(f"{flag(k)} would be ignored: {why}. Drop {flag(k)} or change the run as said")


def check_fsdp(c):
    """--fsdp: what FSDP2 changes, said rather than done silently."""
    if c.optimizer in SAM_TYPES and not c.sync_ascent:
        raise SystemExit(
            "--fsdp: each process holds a shard of the gradient, so the ascent gradient is always the whole "
            "batch's (reduce-scattered): add --sync-ascent, the DDP setting that matches it"
        )
    why = dict(
        amp="--amp fp16 (GradScaler) is not set up for sharded gradients; use --amp bf16",
        sparse_ascent="--sparse-ascent patches nn.Linear with its whole 2:4 mask, which FSDP2 shards",
        mask_select="--mask-select cost ranks tensors by parameter objects, which fully_shard replaces",
        looksam_alpha="--looksam-alpha: LookSAM's g_v is not set up for sharded parameters (ssam.py refuses)",
    )
    for k, v in (("amp", "fp16"), ("sparse_ascent", True), ("mask_select", "cost"), ("looksam_alpha", 0)):
        if (getattr(c, k) == v) != (k == "looksam_alpha"):  # looksam_alpha: any value but 0
            raise SystemExit(f"--fsdp with {why[k]}: drop one of them")


# -----------------------------------------------------------------------------------------------------------
# Saved configs, differences, run names
# -----------------------------------------------------------------------------------------------------------
def load_config(d, where):
    """A saved config (a checkpoint's or final.json's dict) -> Config. One that does not load (a setting this
    train.py does not have, or lacks) is a SystemExit naming the setting and `where` it came from."""
    unknown, missing = sorted(set(d) - set(FIELDS)), [k for k in FIELDS if k not in d]
    if unknown or missing:
        what = f"unknown setting {unknown[0]!r}" if unknown else f"no setting {missing[0]!r}"
        raise SystemExit(
            f"{where}: its config does not load ({what}): it was written by another train.py. Move it "
            "away, or pass --fresh to start over"
        )
    return Config(**d)


def config_diff(saved, c):
    """'k=saved (now x)' for each setting (not one of FREE) where two Configs differ."""
    return [
        f"{k}={getattr(saved, k)!r} (now {getattr(c, k)!r})"
        for k in FIELDS
        if k not in FREE and getattr(saved, k) != getattr(c, k)
    ]


def same_run(saved, c, where):
    """--resume: SystemExit unless the saved config (a dict, from `where`) is c's, up to the FREE settings."""
    diff = config_diff(load_config(saved, where), c)
    if diff:
        raise SystemExit(
            f"--resume: {where} was made with a different config: {', '.join(diff)}. Use the same flags, "
            f"another --out-dir, or --fresh to start over"
        )


def changes(c):
    """(setting, value) of each setting of c that differs from its preset's recipe for its optimizer, in
    field order; not the FREE ones, nor the preset, optimizer and seed (a run name has them anyway)."""
    recipe = from_preset(c.preset, dict(optimizer=c.optimizer))
    skip = (*FREE, "preset", "optimizer", "seed")
    return [(k, getattr(c, k)) for k in FIELDS if k not in skip and getattr(c, k) != getattr(recipe, k)]


SHORT = dict(
    sparsity="s", structure="", mask_select="", ascent_fraction="f", ascent_every="k", looksam_alpha="a"
)


def run_name(c):
    """<preset>-<optimizer>[-<setting><value> for each of changes(c)]-seed<seed>, e.g.
    cifar10-resnet18-ssamf-s0.9-tensor-epochs1-seed0."""
    parts = [
        SHORT.get(k, k.replace("_", "-"))
        + ("" if v is True else f"{v:g}" if isinstance(v, float) else str(v).replace(":", "of"))
        for k, v in changes(c)
    ]
    return "-".join([c.preset, c.optimizer, *parts, f"seed{c.seed}"])
