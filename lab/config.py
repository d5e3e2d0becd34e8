"""The one config of train.py: the Config dataclass (every setting with its default, what it allows and which
optimizer reads it), the paper's recipes as presets, the command line (get_args) and its checks
(resolve_config).

A run's config travels as a plain dict, its *record*: resolve_config's result, final.json's "config". The
record leaves out what the run does not use (None values, knobs its optimizer does not read, and the settings
added after the first checkpoints while they are at their default), so run names and older files stay as they
were. `whole(record)` is the Config it stands for; each checkpoint holds that whole (dataclasses.asdict), and
config_diff compares whole configs, so a config saved in any of these forms compares alike."""

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from lab.methods import OPTIMIZERS, SAM_TYPES, SPARSE  # noqa: F401 (methods are named in lab/methods.py only)

ROOT = Path(__file__).resolve().parent.parent  # the repository
MOMENTUM = 0.9  # SGD momentum of every preset (§5.1); with a cosine LR and crop+flip (+Cutout 16x16 on CIFAR)


def setting(default, ok=None, allowed="", users=None, free=False, added=False, choices=None):
    """A Config field and, next to it, its rules. ok(value) -> bool, with `allowed` the words for the error;
    choices: the values allowed (words made from them); users: the optimizers that read it (given with another
    one, the flag is an error, and the record leaves it out); free: may change between a run and its --resume;
    added: came after the first checkpoints were written, so the record leaves it out at its default."""
    rules = dict(ok=ok, allowed=allowed, users=users, free=free, added=added, choices=choices)
    return field(default=default, metadata=rules)


def finite(low, strict=False):
    return lambda v: math.isfinite(v) and (v > low if strict else v >= low)


def at_least(n):
    return lambda v: v >= n


def fraction(v):
    return 0 <= v <= 1


@dataclass
class Config:
    """Every setting of a run; the flag of field x is --x (underscores as dashes). The field order is the
    order in which a run name lists the settings that differ from its recipe (lab/runs.grid_run): keep it."""

    # the recipe: PRESETS override these (Config's defaults are the cifar10-subset preset, the demo's)
    dataset: str = setting("cifar10-subset", choices=("cifar10-subset", "cifar10", "cifar100", "imagenet"))
    model: str = setting("wrn10-1")  # resnet18 | resnet50 | wrn<depth>-<width> (lab.models.make_model checks)
    epochs: int = setting(6, at_least(1), "an integer >= 1")
    batch_size: int = setting(64, at_least(1), "an integer >= 1")  # global: split over the processes
    lr: float = setting(0.05, finite(0, strict=True), "a finite number > 0")  # peak; cosine decay to 0
    rho: float = setting(0.1, finite(0), "a finite number >= 0", users=SAM_TYPES)  # perturbation radius
    cutout: int = setting(16, at_least(0), "0 (off) or a square side in pixels >= 1")  # CIFAR, p = 0.5
    train_size: int = setting(0, at_least(0), "0 (all images) or a number of images >= 1")  # CIFAR part
    seed: int = setting(0, at_least(0), "an integer >= 0")  # init, data order, augmentation, SSAM-D
    optimizer: str = setting("sgd", choices=OPTIMIZERS)
    sparsity: float = setting(0.5, fraction, "a fraction in [0, 1]", users=SPARSE)  # share NOT perturbed
    structure: str = setting("unstructured", users=SPARSE, choices=("unstructured", "2:4", "tensor"))
    # steps between mask updates
    update_interval: int = setting(
        0, at_least(0), "0 (once an epoch) or a number of steps >= 1", users=SPARSE
    )
    num_samples: int = setting(128, at_least(1), "an integer >= 1", users=("ssamf",))  # Fisher: N_F, Eq. 5
    drop_rate: float = setting(0.5, fraction, "a fraction in [0, 1]", users=("ssamd",))  # alpha, Eq. 9
    amp: str = setting("none", choices=("none", "bf16", "fp16"))
    workers: int = setting(8, at_least(0), "an integer >= 0", free=True)  # ImageNet DataLoader workers
    mask_select: str = setting("paper", users=SPARSE, added=True, choices=("paper", "cost"))  # tensor masks
    ascent_fraction: float = setting(1.0, users=SAM_TYPES, added=True)  # share of the batch the ascent sees
    ascent_every: int = setting(1, at_least(1), "an integer >= 1", users=SAM_TYPES, added=True)  # SAM-k
    looksam_alpha: float = setting(0.0, finite(0), "a finite number >= 0", users=SAM_TYPES, added=True)
    label_noise: float = setting(0.0, lambda v: 0 <= v < 1, "a fraction in [0, 1)", added=True)  # CIFAR
    eval_every: int = setting(1, at_least(1), "an integer >= 1", free=True)  # epochs between tests
    resume: bool = setting(False, free=True)  # continue from <out_dir>/ckpt.pt
    fresh: bool = setting(False, free=True)  # start over even if out_dir holds a checkpoint
    compile: bool = setting(False, free=True)  # torch.compile the model
    channels_last: bool = setting(False)
    adaptive: bool = setting(False, users=("sam",))  # ASAM
    sync_ascent: bool = setting(False, users=SAM_TYPES)  # DDP: all-reduce the ascent gradient too
    fsdp: bool = setting(False, added=True)  # torchrun: FSDP2, every per-parameter state sharded (not DDP)
    preset: str = setting("cifar10-subset")
    data_dir: str | None = setting(None, free=True)
    cache_dir: str | None = setting(None, free=True)  # decoded ImageFolder trees
    sparse_ascent: bool = setting(False, users=SPARSE, added=True)  # 2:4: nn.Linear input grads via W ⊙ M
    device: str | None = setting(None, free=True)  # None: cuda if available, else cpu
    weight_decay: float = setting(5e-4, finite(0), "a finite number >= 0")  # SAM-type: the preset's wd_sam
    name: str | None = setting(None, free=True)  # None: <preset>-<optimizer>[-s<sparsity>...]-seed<seed>
    out_dir: str | None = setting(None, free=True)  # None: runs/<name>


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
USED_BY = {k: f.metadata["users"] for k, f in FIELDS.items() if f.metadata["users"]}
RESUME_FREE = {k for k, f in FIELDS.items() if f.metadata["free"]}  # may change on --resume

# The paper's recipes (§5.1): overrides of Config's defaults. wd_sam: the weight decay of the SAM-type
# optimizers (SAM/SSAM use 1e-3 on CIFAR [14]; WD_SAM when a preset does not say).
WD_SAM = 1e-3
PRESETS = {
    "cifar10-subset": dict(),  # Config's defaults (see below)
    "cifar10-resnet18": dict(dataset="cifar10", model="resnet18", epochs=200, batch_size=128),  # Table 1
    "cifar100-resnet18": dict(dataset="cifar100", model="resnet18", epochs=200, batch_size=128, rho=0.2),
    "cifar10-wrn28-10": dict(dataset="cifar10", model="wrn28-10", epochs=200, batch_size=128),  # Table 2
    "cifar100-wrn28-10": dict(dataset="cifar100", model="wrn28-10", epochs=200, batch_size=128, rho=0.2),
    "imagenet-resnet50": dict(
        dataset="imagenet", model="resnet50", epochs=90, batch_size=256, lr=0.1, rho=0.07
    )
    | dict(weight_decay=1e-4, wd_sam=1e-4),  # Table 3
}
# Why the demo preset is what it is (2-core CPU, SGD): wrn10-1 ran an epoch of the subset in 3.9 s at batch
# 64 and 4.9 s at batch 128, and reached 42.8% / 37.6% test accuracy after 5 epochs; wrn16-1 reached 34% in 3
# epochs of about the same time. 6 epochs kept the four optimizers of --demo under 5 minutes (SAM-type steps
# cost 2 passes; 370 s with 8 epochs, idle box); --demo now trains train.DEMO_EPOCHS (2) for its five rows.


def flag(key):
    return "--" + key.replace("_", "-")


def choose(values):
    return ", ".join(values[:-1]) + " or " + values[-1]


# -----------------------------------------------------------------------------------------------------------
# The record and the whole Config
# -----------------------------------------------------------------------------------------------------------
def used(c, k):
    """Whether the record of c keeps field k: not when it is None, nor when it is a setting added later and at
    its default, nor when it is a knob of a family of optimizers (SAM-type, or SSAM) that c's optimizer is not
    in."""
    f, v = FIELDS[k], getattr(c, k)
    users = set(f.metadata["users"] or OPTIMIZERS)
    family = SPARSE if users <= set(SPARSE) else SAM_TYPES if users <= set(SAM_TYPES) else OPTIMIZERS
    return c.optimizer in family and v is not None and not (f.metadata["added"] and v == f.default)


def record(c):
    """Config -> the record (a dict in field order)."""
    return {k: getattr(c, k) for k in FIELDS if used(c, k)}


def whole(cfg):
    """A record (resolve_config's, final.json's or a checkpoint's, from any train.py version) -> its Config:
    what the record leaves out is at its default. A Config is returned as it is."""
    if isinstance(cfg, Config):
        return cfg
    unknown = set(cfg) - set(FIELDS)
    if unknown:
        raise ValueError(f"not train.py settings: {', '.join(sorted(unknown))}")
    return Config(**cfg)


def config_diff(saved, cfg):
    """Settings (other than where and how a run is stored or resumed) whose values differ, as
    'k=saved (now x)', comparing whole configs: a record written before a setting existed, or saved whole,
    compares alike."""

    def as_dict(d):
        d = dataclasses.asdict(d) if isinstance(d, Config) else d
        return {**d, **dataclasses.asdict(whole({k: v for k, v in d.items() if k in FIELDS}))}

    a, b = as_dict(saved), as_dict(cfg)
    return [
        f"{k}={a.get(k)!r} (now {b.get(k)!r})"
        for k in sorted(set(a) | set(b))
        if k not in RESUME_FREE and a.get(k) != b.get(k)
    ]


# -----------------------------------------------------------------------------------------------------------
# The command line: every flag defaults to None (or False), so that a flag the user gave can be told from a
# default: a given flag that the run would ignore is an error (resolve_config).
# -----------------------------------------------------------------------------------------------------------
def get_args(argv=None, description=None):
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--preset",
        default="cifar10-subset",
        help=f"recipe to start from: {', '.join(PRESETS)} (default: %(default)s)",
    )
    ap.add_argument(
        "--demo",
        action="store_true",
        help="train SGD, SAM, SSAM-F, SSAM-D and cost-aware SSAM-F 0.9 on the preset for 2 epochs "
        "(or --epochs) and print a comparison table",
    )
    recipe_flags(ap.add_argument_group("recipe (default: the preset's value)"))
    optimizer_flags(ap.add_argument_group("optimizer"))
    system_flags(ap.add_argument_group("system"))
    args = ap.parse_args(argv)
    if args.preset not in PRESETS:
        raise SystemExit(f"unknown --preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    return args


def add(group, key, help=None, show_default=False):
    """The flag of Config field `key`, its type from the field; show_default: Config's default in the help."""
    f = FIELDS[key]
    if show_default:
        help += f" (default: {f.default})"
    if f.type is bool:
        return group.add_argument(flag(key), action="store_true", help=help)
    return group.add_argument(flag(key), type=f.type if f.type in (int, float) else None, help=help)


def recipe_flags(g):
    add(g, "dataset", "cifar10-subset | cifar10 | cifar100 | imagenet")
    add(
        g,
        "data_dir",
        "CIFAR: ImageFolder tree <dir>/{train,test}/<class>/*.jpg, or torchvision's download "
        "folder (default data/<dataset>); ImageNet: <dir>/{train,val}/<class>/*",
    )
    add(
        g,
        "cache_dir",
        "where an ImageFolder tree's decoded tensors are cached (default: $SSAM_CACHE_DIR, else "
        "$XDG_CACHE_HOME/ssam, else ~/.cache/ssam)",
    )
    add(g, "model", "resnet18 | resnet50 | wrn<depth>-<width>, e.g. wrn28-10, wrn16-1")
    add(g, "epochs")
    add(g, "batch_size", "global batch, split over torchrun's processes")
    add(g, "lr", "peak learning rate; cosine decay to 0 over all steps")
    add(g, "weight_decay", "default: the preset's wd for SGD, or for SAM/SSAM")
    add(g, "rho", "SAM/SSAM perturbation radius")
    add(g, "cutout", "Cutout square side on CIFAR, applied with p=0.5; 0 = off", show_default=True)
    add(g, "train_size", "CIFAR: train on a fixed random N-image part (0 = all; tests)")
    add(g, "seed", "model init, data order, augmentation, SSAM-D growth", show_default=True)
    add(
        g,
        "label_noise",
        "CIFAR: give this fraction of the training images a wrong label, drawn once with a "
        "fixed seed (the same for every --seed)",
        show_default=True,
    )
    add(
        g,
        "eval_every",
        "test accuracy every N epochs and after the last (default: 1; --demo: only after the last)",
    )


def optimizer_flags(g):
    add(
        g,
        "optimizer",
        "sgd | sam | ssamf | ssamd | samon (SAM on normalization layers only)",
        show_default=True,
    )
    add(
        g,
        "sparsity",
        "SSAM: fraction of weights NOT perturbed; the paper uses 0.5, 0.8, 0.9, 0.95, 0.98, 0.99",
        show_default=True,
    )
    add(
        g,
        "structure",
        "SSAM mask: unstructured | 2:4 (needs sparsity 0.5) | tensor (whole tensors; skips "
        "their ascent weight gradient)",
        show_default=True,
    )
    add(
        g,
        "mask_select",
        "--structure tensor: paper (the tensors of highest mean score) | cost (most score per "
        "unit of ascent-pass cost, ssam.cost_tensor_masks)",
        show_default=True,
    )
    add(
        g,
        "update_interval",
        "steps between SSAM mask updates; 0 = once an epoch, as in the authors' code",
        show_default=True,
    )
    add(g, "num_samples", "SSAM-F: training images for the Fisher estimate (N_F, Eq. 5)", show_default=True)
    add(
        g,
        "drop_rate",
        "SSAM-D: fraction of the mask dropped and regrown at each update (alpha, Eq. 9; cosine-decayed)",
        show_default=True,
    )
    add(g, "adaptive", "SAM: adaptive (ASAM) perturbation")
    add(
        g,
        "sparse_ascent",
        "ssamf/ssamd with --structure 2:4: nn.Linear input gradients of the ascent pass "
        "through W ⊙ M (ssam.sparse_ascent; 2:4 tensor cores on CUDA with --amp)",
    )
    add(
        g,
        "ascent_fraction",
        "SAM-type: run the first (ascent) pass on the first f of each batch, the second on "
        "all of it; 0 < f <= 1",
        show_default=True,
    )
    add(
        g,
        "ascent_every",
        "SAM-type: the ascent (two passes) every k steps, one pass and a plain base step in between "
        "(SAM-k); with --looksam-alpha, LookSAM-k",
        show_default=True,
    )
    add(
        g,
        "looksam_alpha",
        "LookSAM (Liu et al., CVPR 2022) with --ascent-every k > 1: between ascents descend with "
        "g + alpha·||g||/||g_v||·g_v, g_v the part of the last SAM gradient orthogonal to g (the paper: "
        "0.7); 0 = SAM-k",
        show_default=True,
    )
    add(
        g,
        "sync_ascent",
        "DDP: all-reduce the ascent (first) gradient too; default off = each process perturbs "
        "with its own batch's gradient, as in the SAM paper",
    )


def system_flags(g):
    add(g, "device", "cuda | cpu | cuda:N (default: cuda if available)")
    add(g, "amp", "none | bf16 | fp16 (fp16 with a GradScaler)", show_default=True)
    add(g, "compile", "torch.compile the model (the CPU needs a C compiler)")
    add(
        g,
        "fsdp",
        "under torchrun: FSDP2 instead of DDP, each process holds 1/N of the weights, gradients, SAM's "
        "weight copy, masks and momentum (needs --sync-ascent for SAM-type optimizers)",
    )
    add(g, "channels_last", "channels-last memory format")
    add(g, "workers", "ImageNet DataLoader workers", show_default=True)
    add(g, "name", "run name (default: <preset>-<optimizer>[-s<sparsity>]-seed<seed>)")
    add(g, "out_dir", "default runs/<name>")
    add(g, "resume", "continue from <out-dir>/ckpt.pt")
    add(g, "fresh", "start over even if <out-dir> holds a checkpoint")


# -----------------------------------------------------------------------------------------------------------
# Flags -> config: preset, then Config's defaults, overridden by every flag given; every value checked here
# -----------------------------------------------------------------------------------------------------------
def resolve_config(args):
    """The run's record (a plain dict, see the module's docstring). A bad value, or a flag the run would
    ignore, is a one-line SystemExit saying what to pass."""
    given = {
        k: v
        for k, v in vars(args).items()
        if v is not None and v is not False and k not in ("demo", "preset")
    }
    preset = dict(PRESETS[args.preset])
    wd_sam = preset.pop("wd_sam", WD_SAM)
    c = Config(**{**preset, **{k: v for k, v in vars(args).items() if v is not None and k != "demo"}})
    c.optimizer = c.optimizer.lower()
    if args.weight_decay is None:
        c.weight_decay = c.weight_decay if c.optimizer == "sgd" else wd_sam
    check_choices(c)
    for k, f in FIELDS.items():
        if f.metadata["ok"] and not f.metadata["ok"](getattr(c, k)):
            raise SystemExit(f"{flag(k)} {getattr(c, k)!r}: must be {f.metadata['allowed']}")
    if c.resume and c.fresh:
        raise SystemExit("--resume and --fresh contradict each other: pass one of them")
    # the demo runs every optimizer with the same flags: it gives each one those it reads
    ignored = [] if args.demo else ignored_flags(c, given)
    ignored += ignored_data_flags(c, given)
    if ignored:
        k, why = ignored[0]
        raise SystemExit(f"{flag(k)} would be ignored: {why}. Drop {flag(k)} or change the run as said")
    for k in FIELDS:  # what the record leaves out is at its default: whole(record) is this config
        if not used(c, k):
            setattr(c, k, FIELDS[k].default)
    c.name = c.name or run_name(c)
    c.out_dir = c.out_dir or str(ROOT / "runs" / c.name)
    return record(c)


def check_choices(c):
    """The settings that take one of a few words, and the combinations that do not go together."""
    for k, f in sorted(FIELDS.items(), key=lambda kf: kf[0] != "optimizer"):  # the optimizer first
        if f.metadata["choices"] and getattr(c, k) not in f.metadata["choices"]:
            raise SystemExit(f"unknown {flag(k)} {getattr(c, k)!r}: choose {choose(f.metadata['choices'])}")
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
    bad = [
        k
        for k, v in (("amp", "fp16"), ("sparse_ascent", True), ("mask_select", "cost"))
        if getattr(c, k) == v
    ] + (["looksam_alpha"] if c.looksam_alpha else [])
    if bad:
        raise SystemExit(f"--fsdp with {why[bad[0]]}: drop one of them")


def ignored_flags(c, given):
    """(flag, why) for each optimizer flag given that c's optimizer does not read."""
    return [
        (k, f"it is used by --optimizer {' / '.join(USED_BY[k])} only, not {c.optimizer}")
        for k in USED_BY
        if k in given and c.optimizer not in USED_BY[k]
    ]


def ignored_data_flags(c, given):
    """(flag, why) for each data flag given that c's dataset does not read."""
    out = []
    if c.dataset == "cifar10-subset":
        why = (
            "--dataset cifar10-subset is the subset shipped in data/; to train on a tree of your own, pass "
            "--dataset cifar10 or cifar100 (or a --preset cifar10-*/cifar100-*)"
        )
        out += [(k, why) for k in ("data_dir", "cache_dir") if k in given]
    if c.dataset == "imagenet":
        why = "ImageNet uses RandomResizedCrop + flip and the whole train/ folder"
        out += [(k, why) for k in ("cutout", "train_size", "label_noise") if k in given]
        out += (
            [("cache_dir", "ImageNet is read by DataLoader workers, never cached")]
            if "cache_dir" in given
            else []
        )
    elif "workers" in given:
        out += [("workers", "CIFAR sits on the device as one tensor; there are no DataLoader workers")]
    return out


def run_name(c):
    """<preset>-<optimizer>[-s<sparsity>][-<structure>][-cost][-f<ascent fraction>][-k<ascent every>]
    [-a<LookSAM alpha>]-seed<seed>."""
    sp = f"-s{c.sparsity:g}" if c.optimizer in SPARSE else ""
    sp += (
        f"-{c.structure.replace(':', 'of')}"
        if c.optimizer in SPARSE and c.structure != "unstructured"
        else ""
    )
    sp += "-cost" if c.mask_select != "paper" else ""
    sp += f"-f{c.ascent_fraction:g}" if c.optimizer in SAM_TYPES and c.ascent_fraction != 1.0 else ""
    sp += f"-k{c.ascent_every}" if c.optimizer in SAM_TYPES and c.ascent_every != 1 else ""
    sp += f"-a{c.looksam_alpha:g}" if c.optimizer in SAM_TYPES and c.looksam_alpha else ""
    return f"{c.preset}-{c.optimizer}{sp}-seed{c.seed}"
