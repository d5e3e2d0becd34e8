"""Accuracy benchmark in a regime where generalization decides the ranking: SGD, SAM, SSAM-F and SSAM-D
trained to fit their (small, label-noisy) training set, on the full 10,000-image CIFAR-10 test split; seeds
0-2 and 3-5 are reported apart and together (protocol: bench/README.md, "Accuracy"). Per method: test accuracy
mean ± 95% CI, PAIRED differences (same seed) to SGD and to SAM, train accuracy without augmentation, Hessian
lambda_1 and lambda_1/lambda_5.

    python bench/accuracy.py                  # = make bench-accuracy: the default grid, seeds 0-5 (+ figures)
    python bench/accuracy.py --more           # + SSAM-F 0.9/0.99, tensor masks, SAM-ON
    python bench/accuracy.py --cheaper        # + the cheaper ascents, each beside its exact method
    python bench/accuracy.py --seeds 0 1 2    # the selection seeds only
    python bench/accuracy.py -- --epochs 2    # train.py flags after --, appended to SETTING (marked in names)
    python bench/accuracy.py --render-only    # accuracy.json -> accuracy.md again, from the runs it holds

Runs go through lab/grid.py's run_grid (one naming and "done" rule with the demo and scripts/reproduce.py):
a run whose final.json records the same config is reused, anything else is trained;
runs/bench-accuracy/<name>/.
Writes bench/results/accuracy.json and accuracy.md; bench/plots.py draws the figures from the JSON.

--cheaper: cost-aware tensor masks, SAM's ascent on part of the batch and both together, each with
a paired difference (same seed) to the exact method it approximates (CHEAPER_REF) and the verdict of the
decision rule fixed before any of these runs (lab/stats.py cheaper_verdict). Method names: lab/methods.py.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import common
from lab import sharpness
from lab.data import CifarOnDevice, normalize
from lab.grid import grid_run, run_grid, run_state
from lab.methods import flags, label, method_of
from lab.stats import cheaper_verdict, mean_ci, paired

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# The setting (bench/README.md "Accuracy: protocol", fixed before any of its runs): WRN-10-1 on 256 training
# images, 40% of them with a wrong label, no Cutout, 80 epochs at batch 32 (640 steps). A one-seed probe (512
# images, 100 epochs) had SGD fit 81% of its labels, memorize 75% of the wrong ones, and lose 4.3 points to
# SAM; at 50 epochs neither fit (SGD 47%) and they tied; this setting halves the images and keeps most of the
# steps (640 of 800).
SETTING = "--preset cifar10-subset --model wrn10-1 --train-size 256 --label-noise 0.4 --cutout 0 --epochs 80"
SETTING = SETTING.split() + ["--batch-size", "32", "--eval-every", "40"]
METHODS = [("sgd", None), ("sam", None), ("ssamf", 0.5), ("ssamd", 0.5), ("ssamd", 0.9)]
MORE = [("ssamf", 0.9), ("ssamf", 0.99), ("ssamf-tensor", 0.9), ("ssamd-tensor", 0.9), ("samon", None)]
CHEAPER = [
    ("ssamf", 0.9),
    ("ssamf-tensor-cost", 0.9),
    ("ssamd-tensor-cost", 0.9),
    ("sam-f0.25", None),
    ("sam-f0.5", None),
    ("ssamf-tensor-cost-f0.25", 0.9),
    ("ssamf-tensor-cost-f0.5", 0.9),
]
CHEAPER_REF = {  # each cheaper method -> the exact method it approximates
    ("ssamf-tensor-cost", 0.9): ("ssamf", 0.9),
    ("ssamd-tensor-cost", 0.9): ("ssamd", 0.9),
    ("sam-f0.25", None): ("sam", None),
    ("sam-f0.5", None): ("sam", None),
    ("ssamf-tensor-cost-f0.25", 0.9): ("ssamf-tensor-cost", 0.9),
    ("ssamf-tensor-cost-f0.5", 0.9): ("ssamf-tensor-cost", 0.9),
}
SEED_SETS = {"seeds 0-2": [0, 1, 2], "seeds 3-5 (the confirmation set)": [3, 4, 5]}
# lambda_5 within 2% of 40 steps (lab/sharpness.py); lambda_1 converges first
LANCZOS = dict(batch=128, iters=20)


def analyze(cfg, with_sharpness):
    """Train accuracy without augmentation (against the labels trained on, and the true ones) and the
    Hessian's top eigenvalues; cached in <run>/analysis.json next to the checkpoint it was computed from."""
    out_dir = Path(cfg.out_dir)
    cache = out_dir / "analysis.json"
    stamp = os.path.getmtime(out_dir / "ckpt.pt")
    a = json.loads(cache.read_text()) if cache.exists() else {}
    if a.get("ckpt_mtime") != stamp or a.get("lanczos") != LANCZOS:
        a = dict(ckpt_mtime=stamp, lanczos=LANCZOS)
    model, _ = sharpness.load_run(out_dir / "ckpt.pt", "cpu")
    if "train_acc_clean_eval" not in a:
        cpu = torch.device("cpu")
        data = CifarOnDevice(dataclasses.replace(cfg, batch_size=1), cpu, 0, 1)
        true_y = CifarOnDevice(dataclasses.replace(cfg, batch_size=1, label_noise=0.0), cpu, 0, 1).train_y
        with torch.no_grad():
            x = data.train_x
            pred = torch.cat([model(normalize(x[i : i + 500])).argmax(1) for i in range(0, len(x), 500)])
        wrong = data.train_y != true_y
        a["train_acc_eval"] = (pred == data.train_y).float().mean().item()  # the labels it was trained on
        a["train_acc_clean_eval"] = (pred == true_y).float().mean().item()  # the true labels
        memorized = (pred[wrong] == data.train_y[wrong]).float().mean().item() if wrong.any() else None
        a["memorized_noisy"] = memorized
    if with_sharpness and "eigenvalues" not in a:
        x, y = sharpness.train_batch(cfg, LANCZOS["batch"], "cpu")
        a["eigenvalues"] = sharpness.top_eigenvalues(model, x, y, k=5, iters=LANCZOS["iters"])
    cache.write_text(json.dumps(a, indent=1) + "\n")
    return a


def summarize(runs, seeds):
    """Rows per method over `seeds`: test accuracy mean ± CI, paired differences (same seed) to SGD, to SAM
    and, for a cheaper method (CHEAPER_REF), to the exact method it approximates: vs_ref = (mean, ci, n) or
    None, ref = that method's label; the median step time (ms) of its runs."""
    by = {}
    for r in runs:
        if r["seed"] in seeds:
            by.setdefault((r["method"], r["sparsity"]), {})[r["seed"]] = r
    rows = []
    for (method, sp), rs in by.items():
        acc = {s: 100 * r["test_acc"] for s, r in rs.items()}
        row = dict(
            method=method, sparsity=sp, seeds=sorted(rs), n=len(rs), per_seed=[acc[s] for s in sorted(rs)]
        )
        row["mean"], row["ci"] = mean_ci(list(acc.values()))

        def paired_to(key):  # (mean, ci, n) of this method minus method `key`, seed by seed; None: no pair
            other = by.get(key, {}) if key not in (None, (method, sp)) else {}
            return paired(acc, {s: 100 * r["test_acc"] for s, r in other.items()})

        ref = CHEAPER_REF.get((method, sp))
        row.update(
            vs_sgd=paired_to(("sgd", None)),
            vs_sam=paired_to(("sam", None)),
            vs_ref=paired_to(ref),
            ref=None if ref is None else label(*ref),
        )
        steps = [r["step_ms"] for r in rs.values() if r.get("step_ms") is not None]
        row["step_ms"] = statistics.median(steps) if steps else None
        for key in ("train_acc_eval", "train_acc_clean_eval", "memorized_noisy"):
            vals = [100 * r[key] for r in rs.values() if r.get(key) is not None]
            row[key] = statistics.mean(vals) if vals else None
        eig = [r["eigenvalues"] for r in rs.values() if r.get("eigenvalues")]
        row["lambda_1"] = mean_ci([e[0] for e in eig]) + (len(eig),) if eig else None
        row["lambda_ratio"] = mean_ci([e[0] / e[-1] for e in eig]) + (len(eig),) if eig else None
        rows.append(row)
    return rows


def fmt_ci(m, h, digits=2):
    return f"{m:.{digits}f}" + ("" if math.isnan(h) else f" ± {h:.{digits}f}")


def render_row(r, cheaper, judged):
    """One table row: a method's accuracy, paired differences, fit, memorization, sharpness, step time."""
    d = ["–" if r[k] is None else fmt_ci(*r[k][:2]) for k in ("vs_sgd", "vs_sam")]
    if cheaper:
        d.append(
            "–"
            if not r.get("ref")
            else f"no run of {r['ref']}"
            if r["vs_ref"] is None
            else f"{fmt_ci(*r['vs_ref'][:2])} (vs {r['ref']})"
        )
    if judged:
        d.append("–" if r.get("vs_ref") is None else cheaper_verdict(r["vs_ref"]) or "– (1 seed)")
    fit = (
        "–" if r["train_acc_eval"] is None else f"{r['train_acc_eval']:.1f} / {r['train_acc_clean_eval']:.1f}"
    )
    mem = "–" if r["memorized_noisy"] is None else f"{r['memorized_noisy']:.1f}%"
    lam = "–" if r["lambda_1"] is None else fmt_ci(*r["lambda_1"][:2], digits=1) + f" (n={r['lambda_1'][2]})"
    rat = "–" if r["lambda_ratio"] is None else fmt_ci(*r["lambda_ratio"][:2], digits=2)
    ms = "–" if r.get("step_ms") is None else f"{r['step_ms']:.0f}"
    return (
        f"| {label(r['method'], r['sparsity'])} | {fmt_ci(r['mean'], r['ci'])} | {' | '.join(d)} | "
        f"{fit} | {mem} | {lam} | {rat} | {ms} | {', '.join(f'{a:.2f}' for a in r['per_seed'])} |"
    )


def render_table(title, rows, cheaper, judged):
    """One seed set's table; cheaper: a column for the paired Δ to the exact method; judged: the verdict."""
    lines = [
        f"## {title}",
        "",
        "| method | test acc % (mean ± 95% CI) | paired Δ vs SGD | paired Δ vs SAM | "
        + ("paired Δ vs its exact method | " if cheaper else "")
        + ("verdict | " if judged else "")
        + "train acc, no aug. (labels trained on / true) | wrong labels memorized | λ1 | λ1/λ5 | "
        "step ms (median) | per seed |",
        "|---|---|---|---|" + "---|" * (cheaper + judged) + "---|---|---|---|---|---|",
    ]
    return lines + [render_row(r, cheaper, judged) for r in rows] + [""]


def render_notes(s, m, cheaper, widest):
    """The notes under the tables: what each column is, and the cheaper methods' decision rule."""
    lines = [
        "95% CI: t-distribution over seeds (n = 3: mean ± 4.30·sd/√3). Paired Δ: the method minus SGD "
        "(or SAM) with the same seed (same initialization and data order), mean ± 95% CI over seeds; a "
        "difference is beyond noise when its CI excludes 0. One test image is 0.01 point; the binomial "
        "sampling noise of 10,000 images is ±0.85 point (95%) for one accuracy near 25%, and less for a "
        "paired difference on the same images. Train accuracy: the final model in eval mode on its "
        "training images, without augmentation. λ1, λ1/λ5: Hessian of the training loss (the labels "
        f"trained on) at the final weights, {LANCZOS['iters']} Lanczos steps on {LANCZOS['batch']} training "
        "images, eval mode. Step ms: the median over the method's runs of each run's median ms per training "
        f"step; the runs shared the machine's {m['cores']} cores, {s['jobs']} at a time (and with whatever "
        "else ran), so step times are indicative only: the controlled step-time ratios are in "
        "bench/results/throughput.md.",
        "",
    ]
    if not cheaper:
        return lines
    return lines + [
        "Cheaper methods: paired Δ vs its exact method = the cheaper method minus the method it "
        "approximates (cost-aware masks vs the element-wise mask at the same sparsity, --ascent-fraction "
        "f vs the same method on the whole batch), same seed, mean ± 95% CI. Decision rule, fixed before "
        "the runs: a cheaper method keeps its exact method's accuracy when the paired Δ's 95% CI over all "
        "6 seeds includes 0 and its mean is above −1 point; it gains when the whole CI is above 0; it loses "
        "accuracy when the whole CI is below 0; otherwise undecided. Nothing was tuned for these methods, "
        "so all 6 seeds are confirmation runs; seeds 0-2 and 3-5 are still shown apart. The verdict "
        "column is only in the table over all the "
        f'seeds run (here "{widest}"): the rule\'s verdict is the one on seeds 0-5; one on fewer seeds '
        "is not the rule's.",
        "",
    ]


def render(result):
    """The result (accuracy.json's content) -> accuracy.md."""
    s, m = result["settings"], result["machine"]
    lines = [
        "# Accuracy: SGD, SAM, SSAM-F, SSAM-D where the model fits its training data",
        "",
        f"train.py {' '.join(s['setting'])}, one run per method and seed (runs/bench-accuracy/). Test "
        f"accuracy on the full CIFAR-10 test split (10,000 images). {len(result['runs'])} runs; wall time "
        f"of this invocation {result['wall_s'] / 60:.1f} min ({result['trained']} trained, the rest reused), "
        f"{s['jobs']} at a time, one thread each.",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average at the start "
        f"{m.get('loadavg', '?')}.",
        "",
    ]
    if result.get("missing"):
        lines += [
            f"**Incomplete**: {len(result['missing'])} of the {len(result['missing']) + len(result['runs'])} "
            "runs of the grid had not finished and are left out: " + ", ".join(result["missing"]),
            "",
        ]
    seed_sets = result["seed_sets"]
    cheaper = any(r.get("ref") for rows in result["summary"].values() for r in rows)
    widest = (
        max(seed_sets, key=lambda t: len(seed_sets[t])) if seed_sets else None
    )  # "all seeds" when 0-5 ran
    for title in seed_sets:
        rows = result["summary"][title]
        if rows:
            lines += render_table(title, rows, cheaper, judged=cheaper and title == widest)
    return "\n".join(lines + render_notes(s, m, cheaper, widest))


def seed_sets_for(seeds):
    """{title: seeds}: the selection and confirmation sets as far as they ran, and all seeds when both did."""
    seed_sets = {t: [s for s in ss if s in seeds] for t, ss in SEED_SETS.items()}
    seed_sets = {t: ss for t, ss in seed_sets.items() if ss}
    if len(seed_sets) > 1:
        seed_sets[f"all seeds ({', '.join(map(str, seeds))})"] = list(seeds)
    elif not seed_sets:
        seed_sets = {f"seeds {', '.join(map(str, seeds))}": list(seeds)}
    return seed_sets


def train_or_reuse(args, setting):
    """Trains the grid's missing runs (or, with --report, none). -> (configs, done [(cfg, final)], names of
    the runs left out, how many were trained)."""
    methods = list(dict.fromkeys(METHODS + (MORE if args.more else []) + (CHEAPER if args.cheaper else [])))
    grid = [
        setting + flags(mth, sp) + ["--seed", str(seed)]  # seed by seed: a cut-short grid is balanced
        for seed in args.seeds
        for mth, sp in methods
    ]
    cfgs = [grid_run(f, args.runs_dir)[0] for f in grid]
    missing = [c.name for c in cfgs if run_state(c) != "done"]
    if args.report:
        finished = [c for c in cfgs if c.name not in missing]
        done = [(c, json.loads((Path(c.out_dir) / "final.json").read_text())) for c in finished]
        print(
            "\n".join(["not finished, left out:"] + missing) if missing else "all runs finished",
            file=sys.stderr,
        )
        return cfgs, done, missing, 0
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    launch = [sys.executable]
    done = run_grid(grid, args.runs_dir, fresh=args.fresh, launch=launch, jobs=args.jobs, env=env)
    return cfgs, done, [], len(grid) if args.fresh else len(missing)


def collect(done, sharpness_seeds):
    """One dict per finished run: its method, seed, test accuracy, step time, curves and analysis."""
    runs = []
    for cfg, final in done:
        method, sp = method_of(cfg)
        a = analyze(cfg, cfg.seed in sharpness_seeds)
        with open(Path(cfg.out_dir) / "metrics.jsonl") as f:
            log = [json.loads(line) for line in f if line.strip()]
        metrics = [{k: m.get(k) for k in ("epoch", "loss", "acc", "test_acc")} for m in log]  # a small JSON
        keys = ("train_acc_eval", "train_acc_clean_eval", "memorized_noisy", "eigenvalues")
        runs.append(
            dict(
                method=method,
                sparsity=sp,
                seed=cfg.seed,
                name=cfg.name,
                test_acc=final["test_acc"],
                time_s=final["time_s"],
                step_ms=final["step_ms"],
                metrics=metrics,
                **{k: a.get(k) for k in keys},
            )
        )
    return runs


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5], help="default 0-5")
    more = "also SSAM-F 0.9/0.99, tensor masks (SSAM-F/D 0.9), SAM-ON"
    ap.add_argument("--more", action="store_true", help=more)
    ap.add_argument(
        "--cheaper",
        action="store_true",
        help="also the cheaper ascents (cost-aware masks SSAM-F/D 0.9, SAM --ascent-fraction "
        "0.25/0.5, both together) and SSAM-F 0.9, each paired with the exact method it approximates",
    )
    ap.add_argument(
        "--sharpness-seeds",
        type=int,
        nargs="*",
        default=[0, 1, 2],
        help="runs whose Hessian is measured (20 products each; default 0 1 2)",
    )
    jobs = "train.py processes at a time, one thread each (default 2)"
    ap.add_argument("--jobs", type=int, default=2, help=jobs)
    ap.add_argument("--fresh", action="store_true", help="train every run again")
    ap.add_argument(
        "--report", action="store_true", help="train nothing: summarize the runs that have finished"
    )
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="read OUT.json and write OUT.md again from the runs it holds (no run folders needed)",
    )
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-accuracy"))
    ap.add_argument("--out", default=str(HERE / "results" / "accuracy"), help="writes OUT.json and OUT.md")
    ap.add_argument("train_args", nargs="*", help="after --: more train.py flags, appended to SETTING")
    return ap.parse_args(argv)


def rerender(result):
    """accuracy.json's content -> accuracy.md, its summary computed again from the runs it holds."""
    summary = {t: summarize(result["runs"], ss) for t, ss in result["seed_sets"].items()}
    return render(dict(result, summary=json.loads(json.dumps(summary))))


def main(argv=None):
    args = parse_args(argv)
    if args.render_only:
        text = rerender(json.loads(Path(args.out + ".json").read_text()))
        Path(args.out + ".md").write_text(text)
        print(f"-> {args.out}.md", file=sys.stderr)
        return
    setting = SETTING + args.train_args
    machine = common.machine()
    t0 = time.perf_counter()
    cfgs, done, missing, trained = train_or_reuse(args, setting)
    torch.set_num_threads(max(1, args.jobs))
    runs = collect(done, args.sharpness_seeds)
    seed_sets = seed_sets_for(args.seeds)
    title = (
        " ".join(setting[2:])
        if args.train_args
        else "wrn10-1, 256 CIFAR-10 images, 40% wrong labels, 80 epochs"
    )
    result = dict(
        settings=dict(setting=setting, seeds=args.seeds, jobs=args.jobs, lanczos=LANCZOS, title=title),
        machine=machine,
        wall_s=time.perf_counter() - t0,
        trained=trained,
        seed_sets=seed_sets,
        missing=[f"{label(*method_of(c))} seed {c.seed}" for c in cfgs if c.name in missing],
        summary={t: summarize(runs, ss) for t, ss in seed_sets.items()},
        runs=runs,
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    text = render(result)
    Path(args.out + ".md").write_text(text)
    print(text)
    print(f"-> {args.out}.json, {args.out}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
