"""Run the paper's grids with train.py and write our accuracy beside the paper's (Tables 1-3 of Mi et al. 2022).

    python scripts/reproduce.py cifar                      # Tables 1-2: {resnet18, wrn28-10} x {cifar10, cifar100}
    DATA=/data/imagenet python scripts/reproduce.py imagenet                 # Table 3: resnet50 on ImageNet-1K
    MODELS=resnet18 DATASETS=cifar10 OPTIMIZERS=sgd,ssamf SPARSITIES=0.5,0.9 SEEDS=0,1 python scripts/reproduce.py cifar
    LAUNCH="torchrun --standalone --nproc_per_node 8" DATA=/data/imagenet python scripts/reproduce.py imagenet
    python scripts/reproduce.py cifar --dry-run            # list the runs and their state, train nothing
    python scripts/reproduce.py cifar --report             # only (re)write the tables from what has finished

Each run lives in runs/reproduce/<name>/. A run whose final.json exists is skipped; one with a checkpoint is
resumed (train.py --resume); the rest start fresh. After every run the Markdown tables are rewritten:
runs/reproduce_table1.md, _table2.md (CIFAR) and _table3.md (ImageNet): paper, ours (mean ± std over seeds,
n runs) and the difference. Filters come from flags or the environment (flags win): MODELS, DATASETS,
OPTIMIZERS (sgd, sam, ssamf, ssamd), SPARSITIES, SEEDS, DATA (ImageNet root, or the CIFAR root holding
<dataset>/ folders; default data/<dataset>, downloaded by torchvision when missing), LAUNCH (prefix such as
torchrun ...), EXTRA (more train.py flags, e.g. "--amp bf16").
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "reproduce"
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)

# Paper's test accuracy (%), by (model, dataset, optimizer, sparsity); sparsity None for SGD and SAM.
PAPER = {}
for model, rows in {
    "resnet18": [  # Table 1: (optimizer, sparsity, CIFAR-10, CIFAR-100)
        ("sgd", None, 96.07, 77.80), ("sam", None, 96.83, 81.03),
        ("ssamf", 0.5, 96.81, 81.24), ("ssamf", 0.8, 96.64, 80.47), ("ssamf", 0.9, 96.75, 80.02),
        ("ssamf", 0.95, 96.66, 80.50), ("ssamf", 0.98, 96.55, 80.09), ("ssamf", 0.99, 96.52, 80.07),
        ("ssamd", 0.5, 96.87, 80.59), ("ssamd", 0.8, 96.76, 80.43), ("ssamd", 0.9, 96.67, 80.39),
        ("ssamd", 0.95, 96.56, 79.79), ("ssamd", 0.98, 96.61, 79.79), ("ssamd", 0.99, 96.59, 79.61)],
    "wrn28-10": [  # Table 2 (its SSAM-F 99% row is printed under the SSAM-D label; the deltas place it in SSAM-F)
        ("sgd", None, 97.11, 81.93), ("sam", None, 97.48, 84.20),
        ("ssamf", 0.5, 97.71, 85.16), ("ssamf", 0.8, 97.67, 84.57), ("ssamf", 0.9, 97.47, 84.76),
        ("ssamf", 0.95, 97.42, 84.17), ("ssamf", 0.98, 97.32, 83.85), ("ssamf", 0.99, 97.59, 84.00),
        ("ssamd", 0.5, 97.70, 84.99), ("ssamd", 0.8, 97.72, 84.36), ("ssamd", 0.9, 97.53, 84.16),
        ("ssamd", 0.95, 97.52, 83.66), ("ssamd", 0.98, 97.30, 83.30), ("ssamd", 0.99, 97.27, 84.16)],
}.items():
    for opt, sp, c10, c100 in rows:
        PAPER[model, "cifar10", opt, sp], PAPER[model, "cifar100", opt, sp] = c10, c100
for opt, sp, acc in [("sgd", None, 76.67), ("sam", None, 77.25), ("ssamf", 0.5, 77.31), ("ssamf", 0.8, 76.81),
                     ("ssamf", 0.9, 76.74), ("ssamd", 0.5, 77.25), ("ssamd", 0.8, 77.00), ("ssamd", 0.9, 77.00)]:
    PAPER["resnet50", "imagenet", opt, sp] = acc                                    # Table 3
TABLES = {"table1": ("resnet18", ("cifar10", "cifar100")), "table2": ("wrn28-10", ("cifar10", "cifar100")),
          "table3": ("resnet50", ("imagenet",))}


def option(flag_value, env, default, cast=str):
    v = flag_value if flag_value is not None else os.environ.get(env)
    return default if v in (None, "") else [cast(x) for x in str(v).split(",")]


def grid(args):
    """The runs asked for: the paper's rows, filtered."""
    imagenet = args.grid == "imagenet"
    models = option(args.models, "MODELS", ["resnet50"] if imagenet else ["resnet18", "wrn28-10"])
    datasets = option(args.datasets, "DATASETS", ["imagenet"] if imagenet else ["cifar10", "cifar100"])
    optimizers = option(args.optimizers, "OPTIMIZERS", ["sgd", "sam", "ssamf", "ssamd"])
    sparsities = option(args.sparsities, "SPARSITIES", list(SPARSITIES), float)
    seeds = option(args.seeds, "SEEDS", [0], int)
    runs = []
    for (model, dataset, opt, sp) in PAPER:
        if model in models and dataset in datasets and opt in optimizers and (sp is None or sp in sparsities):
            runs += [(model, dataset, opt, sp, seed) for seed in seeds]
    return runs


def run_dir(model, dataset, opt, sp, seed):
    return RUNS / (f"{dataset}-{model}-{opt}" + (f"-s{sp:g}" if sp is not None else "") + f"-seed{seed}")


def state(d):
    return "done" if (d / "final.json").exists() else "resume" if (d / "ckpt.pt").exists() else "todo"


def train_command(model, dataset, opt, sp, seed):
    d = run_dir(model, dataset, opt, sp, seed)
    cmd = shlex.split(os.environ.get("LAUNCH", "")) or [sys.executable]
    cmd += [str(ROOT / "train.py"), "--preset", f"{dataset}-{model}", "--optimizer", opt, "--seed", str(seed),
            "--out-dir", str(d)]
    if sp is not None:
        cmd += ["--sparsity", str(sp)]
    data = os.environ.get("DATA")
    if data:
        cmd += ["--data-dir", data if dataset == "imagenet" else str(Path(data) / dataset)]
    cmd += shlex.split(os.environ.get("EXTRA", ""))
    return cmd + (["--resume"] if state(d) == "resume" else [])


def write_tables():
    """One Markdown file per table, from every finished run under runs/reproduce/."""
    done = {}
    for f in RUNS.glob("*/final.json"):
        r = json.loads(f.read_text())
        c = r["config"]
        key = (c["model"], c["dataset"], c["optimizer"], c.get("sparsity"))
        done.setdefault(key, []).append(100 * r["test_acc"])
    written = []
    for table, (model, datasets) in TABLES.items():
        if not any(k[0] == model and k[1] in datasets for k in done):
            continue
        head = "| optimizer | sparsity | " + " | ".join(f"{d} paper | {d} ours | {d} diff" for d in datasets) + " |"
        lines = [f"# {table}: {model} (test accuracy %, ours = mean ± std over seeds, n = runs)", "",
                 head, "|" + "---|" * (2 + 3 * len(datasets))]
        for (m, d0, opt, sp) in PAPER:
            if m != model or d0 != datasets[0]:
                continue
            cells = []
            for d in datasets:
                paper, ours = PAPER[model, d, opt, sp], done.get((model, d, opt, sp), [])
                if ours:
                    mean = statistics.mean(ours)
                    sd = f" ± {statistics.stdev(ours):.2f}" if len(ours) > 1 else ""
                    cells += [f"{paper:.2f}", f"{mean:.2f}{sd} (n={len(ours)})", f"{mean - paper:+.2f}"]
                else:
                    cells += [f"{paper:.2f}", "—", "—"]
            lines.append(f"| {opt} | {'—' if sp is None else f'{sp:.0%}'} | " + " | ".join(cells) + " |")
        path = ROOT / "runs" / f"reproduce_{table}.md"
        path.write_text("\n".join(lines) + "\n")
        written.append(path)
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", choices=["cifar", "imagenet"])
    ap.add_argument("--models"), ap.add_argument("--datasets"), ap.add_argument("--optimizers")
    ap.add_argument("--sparsities"), ap.add_argument("--seeds")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and their state; train nothing")
    ap.add_argument("--report", action="store_true", help="only write the tables")
    args = ap.parse_args()
    if args.grid == "imagenet" and not os.environ.get("DATA") and not args.report:
        raise SystemExit("ImageNet needs DATA=/path/to/imagenet (holding train/ and val/ class folders)")
    runs = grid(args)
    if not runs:
        raise SystemExit("the filters select no run of the paper's tables; check MODELS/DATASETS/OPTIMIZERS/SPARSITIES")
    for i, run in enumerate(runs if not args.report else []):
        d, st = run_dir(*run), state(run_dir(*run))
        print(f"[{i + 1}/{len(runs)}] {st:6} {d.name}", flush=True)
        if args.dry_run or st == "done":
            continue
        cmd = train_command(*run)
        print("   ", shlex.join(cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            raise SystemExit(f"{d.name} failed; fix it and rerun this command (finished runs are skipped)")
        write_tables()
    for path in write_tables():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
