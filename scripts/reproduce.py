"""Run the paper's grids with train.py and write our accuracy beside the paper's (Tables 1-3 of Mi et al.
2022).

    python scripts/reproduce.py cifar                # Tables 1-2: {resnet18, wrn28-10} x {cifar10, cifar100}
    DATA=/data/imagenet python scripts/reproduce.py imagenet              # Table 3: resnet50 on ImageNet-1K
    MODELS=resnet18 DATASETS=cifar10 OPTIMIZERS=sgd,ssamf SPARSITIES=0.5,0.9 SEEDS=0,1 \\
        python scripts/reproduce.py cifar
    LAUNCH="torchrun --standalone --nproc_per_node 8" DATA=/data/imagenet python scripts/reproduce.py imagenet
    DATA=/data/cifar10 python scripts/reproduce.py cifar-short    # ResNet-18, CIFAR-10, SHORT_EPOCHS, one GPU
    python scripts/reproduce.py cifar --dry-run         # list the runs and their state, train nothing
    python scripts/reproduce.py cifar --report          # only (re)write the tables from what has finished

Runs go through train.py's run_grid, the one runner the demo and bench/accuracy.py use too: the run's name
comes from its config (<dataset>-<model>... plus every setting that differs from the paper's recipe, e.g.
-epochs1-train-size256), a run counts as done only if its final.json records exactly the config asked for,
an interrupted run is resumed, and a folder holding another config is refused (--fresh trains it again).
After every run the tables are rewritten: runs/reproduce_table{1,2,3}.md (and reproduce_short.md): the paper,
ours over the runs with the paper's full recipe (mean ± std, how many seeds) and the difference; runs that
differ from the recipe (EXTRA="--epochs 1 ...") are listed apart with what differs, never in the paper's
column; every cell names its runs. Filters come from flags or the environment (flags win): MODELS, DATASETS,
OPTIMIZERS (sgd, sam, ssamf, ssamd), SPARSITIES, SEEDS, DATA (ImageNet root; for CIFAR an ImageFolder tree
<DATA>/<dataset>/{train,test}/<class>/ or torchvision's folder; default data/<dataset>, downloaded when
missing), LAUNCH (prefix such as torchrun ...), EXTRA (more train.py flags, e.g. "--amp bf16").

cifar-short (make reproduce-cifar-short): ResNet-18 on CIFAR-10 for SGD, SAM, SSAM-F 0.5, SSAM-D 0.5 and
SSAM-F 0.9 with whole-tensor masks, SHORT_EPOCHS epochs (default 15) with bf16 autocast, channels-last and
torch.compile (SHORT_FLAGS); prints accuracy, ms/step and x SGD. 15 epochs is an estimate of what fits in
about 8 minutes of one H100, not a measurement (its arithmetic: bench/README.md, "Reproducing Tables 1-3").
"""

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

from lab.config import changes, from_preset, load_config
from lab.grid import grid_run, run_grid, run_state
from lab.methods import METHODS, SPARSE, flags, method_of

ROOT = Path(__file__).resolve().parent.parent

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
SHORT_EPOCHS = 15
SHORT_FLAGS = "--amp bf16 --channels-last --compile"
SHORT = [
    ("sgd", None),
    ("sam", None),
    ("ssamf", 0.5),
    ("ssamd", 0.5),
    ("ssamf-tensor", 0.9),
]  # lab/methods.py

# Paper's test accuracy (%), by (model, dataset, optimizer, sparsity); sparsity None for SGD and SAM.
PAPER = {}
for model, rows in {
    "resnet18": [  # Table 1: (optimizer, sparsity, CIFAR-10, CIFAR-100)
        ("sgd", None, 96.07, 77.80),
        ("sam", None, 96.83, 81.03),
        ("ssamf", 0.5, 96.81, 81.24),
        ("ssamf", 0.8, 96.64, 80.47),
        ("ssamf", 0.9, 96.75, 80.02),
        ("ssamf", 0.95, 96.66, 80.50),
        ("ssamf", 0.98, 96.55, 80.09),
        ("ssamf", 0.99, 96.52, 80.07),
        ("ssamd", 0.5, 96.87, 80.59),
        ("ssamd", 0.8, 96.76, 80.43),
        ("ssamd", 0.9, 96.67, 80.39),
        ("ssamd", 0.95, 96.56, 79.79),
        ("ssamd", 0.98, 96.61, 79.79),
        ("ssamd", 0.99, 96.59, 79.61),
    ],
    # Table 2 (its SSAM-F 99% row is printed under the SSAM-D label; the deltas place it in SSAM-F)
    "wrn28-10": [
        ("sgd", None, 97.11, 81.93),
        ("sam", None, 97.48, 84.20),
        ("ssamf", 0.5, 97.71, 85.16),
        ("ssamf", 0.8, 97.67, 84.57),
        ("ssamf", 0.9, 97.47, 84.76),
        ("ssamf", 0.95, 97.42, 84.17),
        ("ssamf", 0.98, 97.32, 83.85),
        ("ssamf", 0.99, 97.59, 84.00),
        ("ssamd", 0.5, 97.70, 84.99),
        ("ssamd", 0.8, 97.72, 84.36),
        ("ssamd", 0.9, 97.53, 84.16),
        ("ssamd", 0.95, 97.52, 83.66),
        ("ssamd", 0.98, 97.30, 83.30),
        ("ssamd", 0.99, 97.27, 84.16),
    ],
}.items():
    for opt, sp, c10, c100 in rows:
        PAPER[model, "cifar10", opt, sp], PAPER[model, "cifar100", opt, sp] = c10, c100
for opt, sp, acc in [
    ("sgd", None, 76.67),
    ("sam", None, 77.25),
    ("ssamf", 0.5, 77.31),
    ("ssamf", 0.8, 76.81),
    ("ssamf", 0.9, 76.74),
    ("ssamd", 0.5, 77.25),
    ("ssamd", 0.8, 77.00),
    ("ssamd", 0.9, 77.00),
]:
    PAPER["resnet50", "imagenet", opt, sp] = acc  # Table 3
TABLES = {
    "table1": ("resnet18", ("cifar10", "cifar100")),
    "table2": ("wrn28-10", ("cifar10", "cifar100")),
    "table3": ("resnet50", ("imagenet",)),
}


def option(flag_value, env, default, cast=str):
    v = flag_value if flag_value is not None else os.environ.get(env)
    return default if v in (None, "") else [cast(x) for x in str(v).split(",")]


def grid(args):
    """The runs asked for, as train.py flag lists: the paper's rows filtered, or the short grid."""
    seeds = option(args.seeds, "SEEDS", [0], int)
    data = os.environ.get("DATA")
    extra = shlex.split(os.environ.get("EXTRA", ""))
    if args.grid == "cifar-short":
        short = ["--epochs", os.environ.get("SHORT_EPOCHS") or str(SHORT_EPOCHS)]
        short += shlex.split(os.environ.get("SHORT_FLAGS", SHORT_FLAGS))
        short += ["--data-dir", data] if data else []
        optimizers = option(args.optimizers, "OPTIMIZERS", ["sgd", "sam", "ssamf", "ssamd"])
        return [
            ["--preset", "cifar10-resnet18", *flags(m, sp), "--seed", str(seed), *short, *extra]
            for m, sp in SHORT
            if METHODS[m]["settings"]["optimizer"] in optimizers
            for seed in seeds
        ]
    imagenet = args.grid == "imagenet"
    models = option(args.models, "MODELS", ["resnet50"] if imagenet else ["resnet18", "wrn28-10"])
    datasets = option(args.datasets, "DATASETS", ["imagenet"] if imagenet else ["cifar10", "cifar100"])
    optimizers = option(args.optimizers, "OPTIMIZERS", ["sgd", "sam", "ssamf", "ssamd"])
    sparsities = option(args.sparsities, "SPARSITIES", list(SPARSITIES), float)
    runs = []
    for model, dataset, opt, sp in PAPER:
        if model in models and dataset in datasets and opt in optimizers and (sp is None or sp in sparsities):
            for seed in seeds:
                run = ["--preset", f"{dataset}-{model}", "--optimizer", opt, "--seed", str(seed)]
                run += [] if sp is None else ["--sparsity", str(sp)]
                if data:
                    run += ["--data-dir", data if dataset == "imagenet" else str(Path(data) / dataset)]
                runs.append(run + extra)
    return runs


def finished_runs(runs_dir):
    """Every finished run under runs_dir: (its final.json, the paper's cell it belongs to, what differs from
    the paper's recipe: [] for a recipe run). The cell comes from the run's preset, optimizer and sparsity."""
    out = []
    for f in sorted(Path(runs_dir).glob("*/final.json")):
        r = json.loads(f.read_text())
        c = load_config(r["config"], f)
        recipe = from_preset(c.preset, {})
        sparsity = c.sparsity if c.optimizer in SPARSE else None
        differ = [f"{k.replace('_', '-')} {v}" for k, v in changes(c) if k != "sparsity"]
        cell = (recipe.model, recipe.dataset, c.optimizer, sparsity)
        out.append(dict(final=r, dir=f.parent, cell=cell, seed=c.seed, differ=differ))
    return out


def ours(runs):
    """'mean ± std (n seeds)' of the test accuracies of runs (%); the seeds are counted, not the runs."""
    accs = [100 * r["final"]["test_acc"] for r in runs]
    seeds = sorted({r["seed"] for r in runs})
    mean = statistics.mean(accs)
    sd = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
    return mean, f"{mean:.2f}{sd} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})"


def cell_name(model, dataset, opt, sp):
    return f"{dataset} {model} {opt}" + ("" if sp is None else f" {sp:.0%}")


def write_tables(runs_dir):
    """One Markdown file per paper table, from every finished run under runs_dir, next to runs_dir."""
    runs = finished_runs(runs_dir)
    written = []
    for table, (model, datasets) in TABLES.items():
        mine = [r for r in runs if r["cell"][0] == model and r["cell"][1] in datasets]
        if not mine:
            continue
        lines = paper_table(table, model, datasets, [r for r in mine if not r["differ"]], runs_dir)
        lines += other_runs([r for r in mine if r["differ"]])
        path = Path(runs_dir).parent / f"reproduce_{table}.md"
        path.write_text("\n".join(lines) + "\n")
        written.append(path)
    return written


def paper_table(table, model, datasets, recipe, runs_dir):
    """The paper's rows of one table beside ours (its full recipe's runs), and the runs behind each cell."""
    head = (
        "| optimizer | sparsity | " + " | ".join(f"{d} paper | {d} ours | {d} diff" for d in datasets) + " |"
    )
    lines = [
        f"# {table}: {model}, test accuracy %",
        "",
        "ours = mean ± std over the runs with the paper's full recipe (the preset, nothing changed), and "
        "how many seeds; runs with anything changed are listed below the table, never in it.",
        "",
        head,
        "|" + "---|" * (2 + 3 * len(datasets)),
    ]
    for m, d0, opt, sp in PAPER:
        if m != model or d0 != datasets[0]:
            continue
        cells = []
        for d in datasets:
            paper = PAPER[model, d, opt, sp]
            rs = [r for r in recipe if r["cell"] == (model, d, opt, sp)]
            mean, text = ours(rs) if rs else (None, "—")
            cells += [f"{paper:.2f}", text, "—" if mean is None else f"{mean - paper:+.2f}"]
        lines.append(f"| {opt} | {'—' if sp is None else f'{sp:.0%}'} | " + " | ".join(cells) + " |")
    lines += ["", "Runs behind each cell (folders in " + str(runs_dir) + "):", ""]
    for cell in sorted({r["cell"] for r in recipe}, key=str):
        lines.append(
            f"- {cell_name(*cell)}: " + ", ".join(r["dir"].name for r in recipe if r["cell"] == cell)
        )
    if not recipe:
        lines.append("- none: no run with the paper's full recipe has finished yet")
    return lines


def other_runs(other):
    """The runs that changed something of the recipe: apart, with what they changed, never in the table."""
    if not other:
        return []
    lines = [
        "",
        "## Not the paper's recipe (not in the table above)",
        "",
        "| paper's cell | what differs from the recipe | ours | paper | runs |",
        "|---|---|---|---|---|",
    ]
    groups = {}
    for r in other:
        groups.setdefault((r["cell"], tuple(r["differ"])), []).append(r)
    for (cell, differ), rs in sorted(groups.items(), key=str):
        lines.append(
            f"| {cell_name(*cell)} | {', '.join(differ)} | {ours(rs)[1]} | {PAPER[cell]:.2f} | "
            + ", ".join(r["dir"].name for r in rs)
            + " |"
        )
    return lines


def short_table(done):
    """The cifar-short grid: accuracy, ms/step and x SGD per method (mean over seeds), as Markdown."""
    rows, sgd_ms = {}, None
    for cfg, final in done:
        if final is None:
            continue
        sparsity = method_of(cfg)[1]
        rows.setdefault((cfg.optimizer, sparsity, cfg.structure), []).append(final)
    if not rows:
        return None
    sgd = rows.get(("sgd", None, "unstructured"))
    sgd_ms = statistics.mean(f["step_ms"] for f in sgd) if sgd else None
    c = next(cfg for cfg, f in done if f is not None)
    lines = [
        f"# cifar-short: {c.model} on {c.dataset}, {c.epochs} epochs (the paper trains 200: not its "
        f"recipe), amp {c.amp}, channels-last {c.channels_last}, compile {c.compile}",
        "",
        "| method | test acc % | ms/step | x SGD | seeds | device |",
        "|---|---|---|---|---|---|",
    ]
    for (o, sp, st), fs in rows.items():
        ms = statistics.mean(f["step_ms"] for f in fs)
        name = o + ("" if sp is None else f" {sp:g}") + ("" if st == "unstructured" else f" {st}")
        lines.append(
            f"| {name} | {ours([dict(final=f, seed=f['config']['seed']) for f in fs])[1]} | {ms:.1f} | "
            f"{'–' if not sgd_ms else f'{ms / sgd_ms:.2f}'} | {len(fs)} | {fs[0]['device']} |"
        )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", choices=["cifar", "imagenet", "cifar-short"])
    ap.add_argument("--models"), ap.add_argument("--datasets"), ap.add_argument("--optimizers")
    ap.add_argument("--sparsities"), ap.add_argument("--seeds")
    ap.add_argument(
        "--runs-dir",
        default=str(ROOT / "runs" / "reproduce"),
        help="default runs/reproduce; the tables are written next to it",
    )
    ap.add_argument("--dry-run", action="store_true", help="list the runs and their state; train nothing")
    ap.add_argument("--report", action="store_true", help="only write the tables")
    ap.add_argument("--fresh", action="store_true", help="train every run of the grid again from scratch")
    args = ap.parse_args()
    if args.grid == "imagenet" and not os.environ.get("DATA") and not args.report:
        raise SystemExit("ImageNet needs DATA=/path/to/imagenet (holding train/ and val/ class folders)")
    runs_dir = Path(args.runs_dir) / ("short" if args.grid == "cifar-short" else "")
    runs = grid(args)
    if not runs:
        raise SystemExit(
            "the filters select no run of the paper's tables; check MODELS/DATASETS/OPTIMIZERS/SPARSITIES"
        )
    launch = shlex.split(os.environ.get("LAUNCH", "")) or [sys.executable]
    if args.report:
        done = [
            (
                cfg,
                json.loads((Path(cfg.out_dir) / "final.json").read_text())
                if run_state(cfg) == "done"
                else None,
            )
            for cfg, _ in (grid_run(f, runs_dir) for f in runs)
        ]
    elif args.dry_run:
        done = run_grid(runs, runs_dir, fresh=args.fresh, launch=launch, dry_run=True)
    else:
        done = []
        for flags in runs:  # one at a time, so the tables are rewritten after every run
            done += run_grid([flags], runs_dir, fresh=args.fresh, launch=launch, dry_run=args.dry_run)
            if args.grid != "cifar-short" and not args.dry_run:
                write_tables(runs_dir)
    if args.grid == "cifar-short":
        text = short_table(done)
        if text:
            path = Path(args.runs_dir).parent / "reproduce_short.md"
            path.write_text(text)
            print(text + f"\nwrote {path}")
        return
    for path in write_tables(runs_dir):
        print(path.read_text() + f"\nwrote {path}")


if __name__ == "__main__":
    main()
