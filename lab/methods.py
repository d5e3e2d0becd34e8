"""The one place that names methods. A method is '<optimizer>[-tensor|-cost][-f<fraction>][-k<k>[-a<alpha>]]',
with a sparsity beside it (None for SGD, SAM, SAM-ON):
- '-tensor': whole-tensor masks (--structure tensor, the paper's ranking);
- '-cost': the same, chosen by score per ascent cost (--structure tensor --mask-select cost);
- '-f0.25': the ascent pass on the first quarter of each batch (--ascent-fraction 0.25);
- '-k5': the ascent every 5 steps, plain steps between (--ascent-every 5, SAM-k);
- '-k5-a0.7': LookSAM-5 with alpha 0.7 (--ascent-every 5 --looksam-alpha 0.7).
Examples: 'ssamf' at 0.5, 'ssamd-cost' at 0.9, 'sam-f0.5', 'sam-k5-a0.7'. No torch here: bench/plots.py uses
it too.
"""

OPTIMIZERS = ("sgd", "sam", "ssamf", "ssamd", "samon")  # train.py --optimizer
SAM_TYPES = ("sam", "ssamf", "ssamd", "samon")  # two passes a step: ascent, then descent at w + eps
SPARSE = ("ssamf", "ssamd")  # the optimizers with a sparsity and a mask that is updated
MASKED = (*SPARSE, "samon")  # the optimizers with a mask: their density is logged
NAMES = dict(sgd="SGD", sam="SAM", ssamf="SSAM-F", ssamd="SSAM-D", samon="SAM-ON")
MASKS = dict(tensor=" tensor", cost=" cost-aware")  # the mask suffixes and their words in a label

# A fixed colour per method in the figures (bench/plots.py); a method not listed gets one of EXTRA_COLORS.
COLORS = {
    "sgd": "tab:gray",
    "sam": "tab:blue",
    "ssamf": "tab:orange",
    "ssamd": "tab:green",
    "samon": "tab:purple",
    "ssamd-tensor": "tab:red",
    "ssamf-tensor": "tab:brown",
    "sam-f0.25": "tab:pink",
    "sam-f0.5": "tab:olive",
    "ssamd-cost": "tab:cyan",
    "ssamf-cost": "black",
    "ssamf-cost-f0.25": "gold",
    "ssamf-cost-f0.5": "navy",
}
EXTRA_COLORS = ["teal", "maroon", "lime", "indigo"]


def parse(method):
    """'<optimizer>[-tensor|-cost][-f<fraction>][-k<k>[-a<alpha>]]' -> (optimizer, masks: None / 'tensor' /
    'cost', fraction, k, alpha; None where absent). ValueError for anything else."""
    opt, *rest = method.split("-")
    masks = rest.pop(0) if rest and rest[0] in MASKS else None
    fraction = float(rest.pop(0)[1:]) if rest and rest[0].startswith("f") and rest[0][1:] else None
    k = int(rest.pop(0)[1:]) if rest and rest[0].startswith("k") and rest[0][1:].isdigit() else None
    alpha = float(rest.pop(0)[1:]) if k and rest and rest[0].startswith("a") and rest[0][1:] else None
    if rest or opt not in NAMES:
        raise ValueError(
            f"method {method!r}: expected <optimizer>[-tensor|-cost][-f<fraction>][-k<k>[-a<alpha>]] with an "
            f"optimizer of {', '.join(NAMES)}"
        )
    return opt, masks, fraction, k, alpha


def flags(method, sparsity):
    """-> the train.py flags that run this method at this sparsity (None: no --sparsity)."""
    opt, masks, fraction, k, alpha = parse(method)
    f = ["--optimizer", opt] + ([] if sparsity is None else ["--sparsity", str(sparsity)])
    f += [] if masks is None else ["--structure", "tensor"]
    f += ["--mask-select", "cost"] if masks == "cost" else []
    f += [] if fraction is None else ["--ascent-fraction", f"{fraction:g}"]
    f += [] if k is None else ["--ascent-every", str(k)]
    return f + ([] if alpha is None else ["--looksam-alpha", f"{alpha:g}"])


def method_of(cfg):
    """A run's config (train.py's; a flag at its default may be absent) -> (method, sparsity)."""
    structure = cfg.get("structure", "unstructured")
    if structure not in ("unstructured", "tensor"):
        raise ValueError(f"--structure {structure} has no method name (named: unstructured, tensor)")
    cost = cfg.get("mask_select", "paper") == "cost"
    masks = "" if structure != "tensor" else "-cost" if cost else "-tensor"
    fraction, k, alpha = cfg.get("ascent_fraction", 1.0), cfg.get("ascent_every", 1), cfg.get("looksam_alpha")
    every = ("" if k == 1 else f"-k{k}") + (f"-a{alpha:g}" if alpha else "")
    return cfg["optimizer"] + masks + ("" if fraction == 1.0 else f"-f{fraction:g}") + every, cfg.get(
        "sparsity"
    )


def label(method, sparsity=None):
    """e.g. 'SSAM-F 0.5', 'SSAM-D tensor 0.9', 'SSAM-F cost-aware 0.9, f=0.25', 'SAM f=0.5', 'SAM k=5',
    'LookSAM k=5 α=0.7', 'SAM f=0.5, LookSAM k=5 α=0.7'."""
    opt, masks, fraction, k, alpha = parse(method)
    text = NAMES[opt] + MASKS.get(masks, "") + ("" if sparsity is None else f" {sparsity:g}")
    text += "" if fraction is None else ("," if sparsity is not None else "") + f" f={fraction:g}"
    if k is None:
        return text
    if text == "SAM" and alpha:
        return f"LookSAM k={k} α={alpha:g}"
    sep = "," if sparsity is not None or fraction is not None else ""
    return text + sep + (f" LookSAM k={k} α={alpha:g}" if alpha else f" k={k}")


def color(method):
    """The method's colour in the figures: COLORS, else one of EXTRA_COLORS picked by the name."""
    parse(method)
    return COLORS.get(method) or EXTRA_COLORS[sum(map(ord, method)) % len(EXTRA_COLORS)]
