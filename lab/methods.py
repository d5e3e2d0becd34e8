"""The table of methods. A method is one of train.py's optimizers with some of its settings; each is declared
once, in METHODS, and train.py, bench/ and scripts/reproduce.py read it. An SSAM method's sparsity is given
beside it: ('ssamf-tensor-cost', 0.9). A method's name is what its settings add to a run name
(lab/config.run_name): <optimizer>[-tensor|-2of4][-cost][-f<ascent fraction>][-k<ascent every>][-a<LookSAM
alpha>][-sparse-ascent]; with its sparsity, key(): 'ssamf-s0.9-tensor-cost'. No torch here: bench/plots.py
uses it too.
"""

# The paper's theoretical cost of a step relative to SGD (Tables 1-3, FLOPs column), by sparsity
PAPER_FLOPS = {0.5: 1.65, 0.8: 1.44, 0.9: 1.36, 0.95: 1.33, 0.98: 1.31, 0.99: 1.30}


def method(settings, label, family, color, flops=None, bench=()):
    """An entry of METHODS. settings: train.py flags as {setting: value} (the optimizer's among them);
    label: its name in tables and figures, '{s}' where the sparsity goes; family: 'sgd' (one pass), 'sam'
    (two passes: ascent, then descent at w + eps), 'ssam' (SAM with a sparsity and a mask it updates);
    color: in the figures (bench/plots.py); flops: the paper's FLOPs x SGD by sparsity (None: no
    sparsity); bench: (sparsity, weights) pairs the throughput benchmark times, weights 'fresh' (the seed-0
    init) or 'trained' (after a few SGD steps: Fisher and |g| rankings change with training)."""
    return dict(settings=settings, label=label, family=family, color=color, flops=flops, bench=bench)


SSAM_FLOPS = PAPER_FLOPS
METHODS = {  # the order of the figures' legends
    "sgd": method(dict(optimizer="sgd"), "SGD", "sgd", "tab:gray", {None: 1.0}, [(None, "fresh")]),
    "sam": method(dict(optimizer="sam"), "SAM", "sam", "tab:blue", {None: 2.0}, [(None, "fresh")]),
    "ssamf": method(dict(optimizer="ssamf"), "SSAM-F{s}", "ssam", "tab:orange", SSAM_FLOPS, [(0.5, "fresh")]),
    "ssamd": method(
        dict(optimizer="ssamd"),
        "SSAM-D{s}",
        "ssam",
        "tab:green",
        SSAM_FLOPS,
        [(0.5, "fresh"), (0.9, "fresh")],
    ),
    "samon": method(dict(optimizer="samon"), "SAM-ON", "sam", "tab:purple", bench=[(None, "fresh")]),
    # whole-tensor masks (the paper's ranking)
    "ssamd-tensor": method(
        dict(optimizer="ssamd", structure="tensor"), "SSAM-D tensor{s}", "ssam", "tab:red"
    ),
    "ssamf-tensor": method(
        dict(optimizer="ssamf", structure="tensor"),
        "SSAM-F tensor{s}",
        "ssam",
        "tab:brown",
        bench=[(0.9, "fresh"), (0.9, "trained")],
    ),
    # the ascent pass on the first f of each batch
    "sam-f0.25": method(
        dict(optimizer="sam", ascent_fraction=0.25), "SAM f=0.25", "sam", "tab:pink", bench=[(None, "fresh")]
    ),
    "sam-f0.5": method(
        dict(optimizer="sam", ascent_fraction=0.5), "SAM f=0.5", "sam", "tab:olive", bench=[(None, "fresh")]
    ),
    # whole-tensor masks chosen by score per unit of ascent-pass cost (+ the ascent on part of the batch)
    "ssamd-tensor-cost": method(
        dict(optimizer="ssamd", structure="tensor", mask_select="cost"),
        "SSAM-D cost-aware{s}",
        "ssam",
        "tab:cyan",
        bench=[(0.9, "fresh")],
    ),
    "ssamf-tensor-cost": method(
        dict(optimizer="ssamf", structure="tensor", mask_select="cost"),
        "SSAM-F cost-aware{s}",
        "ssam",
        "black",
        bench=[(0.9, "fresh"), (0.9, "trained")],
    ),
    "ssamf-tensor-cost-f0.25": method(
        dict(optimizer="ssamf", structure="tensor", mask_select="cost", ascent_fraction=0.25),
        "SSAM-F cost-aware{s}, f=0.25",
        "ssam",
        "gold",
        bench=[(0.9, "fresh")],
    ),
    "ssamf-tensor-cost-f0.5": method(
        dict(optimizer="ssamf", structure="tensor", mask_select="cost", ascent_fraction=0.5),
        "SSAM-F cost-aware{s}, f=0.5",
        "ssam",
        "navy",
        bench=[(0.9, "fresh")],
    ),
    # the ascent every k steps, plain steps between (SAM-k), and LookSAM-k with the paper's alpha 0.7: g_v
    # kept from the ascent step, g + alpha·||g||/||g_v||·g_v between (ssam.py, per tensor)
    **{
        f"sam-k{k}": method(
            dict(optimizer="sam", ascent_every=k), f"SAM k={k}", "sam", c, bench=[(None, "fresh")]
        )
        for k, c in ((2, "indigo"), (5, "lime"), (10, "darkgreen"))
    },
    **{
        f"sam-k{k}-a0.7": method(
            dict(optimizer="sam", ascent_every=k, looksam_alpha=0.7),
            f"LookSAM k={k} α=0.7",
            "sam",
            c,
            bench=[(None, "fresh")],
        )
        for k, c in ((2, "crimson"), (5, "darkorange"), (10, "sienna"))
    },
    # LookSAM at smaller alpha (the frontier's second screen round): alpha scales one vector, so the step runs
    # alpha 0.7's operations; only the confirmation's candidate at <= 1.15x SGD (k=10, alpha 0.1) is timed
    **{
        f"sam-k{k}-a{a}": method(
            dict(optimizer="sam", ascent_every=k, looksam_alpha=a),
            f"LookSAM k={k} α={a}",
            "sam",
            c,
            bench=[(None, "fresh")] if (k, a) == (10, 0.1) else (),
        )
        for k, a, c in ((5, 0.1, "peru"), (5, 0.3, "tan"), (10, 0.1, "olive"), (10, 0.3, "yellowgreen"))
    },
    # LookSAM-k with the ascent on a fraction f of the batch
    **{
        f"sam-f{f}-k{k}-a0.7": method(
            dict(optimizer="sam", ascent_fraction=f, ascent_every=k, looksam_alpha=0.7),
            f"SAM f={f}, LookSAM k={k} α=0.7",
            "sam",
            c,
            bench=[(None, "fresh")],
        )
        for f, k, c in ((0.5, 5, "orchid"), (0.25, 2, "deeppink"))
    },
    "ssamf-tensor-cost-k2-a0.7": method(
        dict(optimizer="ssamf", structure="tensor", mask_select="cost", ascent_every=2, looksam_alpha=0.7),
        "SSAM-F cost-aware{s}, LookSAM k=2 α=0.7",
        "ssam",
        "slategray",
        bench=[(0.9, "fresh")],
    ),
    # 2:4 masks (N:M), and their ascent-pass input gradients through W ⊙ M
    "ssamd-2of4": method(
        dict(optimizer="ssamd", structure="2:4"),
        "SSAM-D 2:4{s}",
        "ssam",
        "teal",
        SSAM_FLOPS,
        [(0.5, "fresh")],
    ),
    "ssamd-2of4-sparse-ascent": method(
        dict(optimizer="ssamd", structure="2:4", sparse_ascent=True),
        "SSAM-D 2:4{s}, sparse ascent",
        "ssam",
        "maroon",
        SSAM_FLOPS,
        [(0.5, "fresh")],
    ),
}

# train.py's --optimizer choices and their families, from the table
OPTIMIZERS = tuple(dict.fromkeys(m["settings"]["optimizer"] for m in METHODS.values()))
FAMILY = {m["settings"]["optimizer"]: m["family"] for m in METHODS.values()}
SAM_TYPES = tuple(o for o in OPTIMIZERS if FAMILY[o] in ("sam", "ssam"))  # two passes a step
SPARSE = tuple(o for o in OPTIMIZERS if FAMILY[o] == "ssam")  # a sparsity and a mask that is updated


def get(name):
    """METHODS[name]; a ValueError naming the methods for any other name."""
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not in lab/methods.py: one of {', '.join(METHODS)}")
    return METHODS[name]


def flags(name, sparsity=None):
    """-> the train.py flags that run this method at this sparsity (None: no --sparsity)."""
    out = []
    for k, v in get(name)["settings"].items():
        out += ["--" + k.replace("_", "-")] + (
            [] if v is True else [f"{v:g}" if isinstance(v, float) else str(v)]
        )
    return out + ([] if sparsity is None else ["--sparsity", str(sparsity)])


def method_of(c):
    """A run's Config -> (method, sparsity): the method whose settings c has, every other setting that a
    method sets at its default."""
    knobs = {k for m in METHODS.values() for k in m["settings"]}
    plain = type(c)()  # the defaults
    for name, m in METHODS.items():
        if all(getattr(c, k) == m["settings"].get(k, getattr(plain, k)) for k in knobs):
            return name, c.sparsity if m["family"] == "ssam" else None
    shown = ", ".join(f"{k}={getattr(c, k)!r}" for k in sorted(knobs))
    raise ValueError(f"no method of lab/methods.py runs {shown}")


def key(name, sparsity=None):
    """The method at a sparsity as one word, the sparsity after the optimizer: 'ssamf-s0.9-tensor-cost'."""
    opt, _, rest = name.partition("-")
    return "-".join([opt] + ([] if sparsity is None else [f"s{sparsity:g}"]) + ([rest] if rest else []))


def split(k):
    """key() back: 'ssamf-s0.9-tensor-cost' -> ('ssamf-tensor-cost', 0.9)."""
    opt, *rest = k.split("-")
    sp = float(rest.pop(0)[1:]) if rest and rest[0][:1] == "s" and rest[0][1:2].isdigit() else None
    name = "-".join([opt, *rest])
    get(name)
    return name, sp


def label(name, sparsity=None):
    """e.g. 'SSAM-F 0.5', 'SSAM-D tensor 0.9', 'SSAM-F cost-aware 0.9, f=0.25', 'SAM f=0.5'."""
    return get(name)["label"].format(s="" if sparsity is None else f" {sparsity:g}")


def color(name):
    return get(name)["color"]
