"""Accuracy benchmark in a regime where generalization decides the ranking: SGD, SAM, SSAM-F and SSAM-D trained
to fit their (small, label-noisy) training set, on the full 10,000-image CIFAR-10 test split; seeds 0-2 chose the
setting, seeds 3-5 confirm it (README, "Accuracy"). Per method: test accuracy mean ± 95% CI, PAIRED differences
(same seed) to SGD and to SAM, train accuracy without augmentation, Hessian lambda_1 and lambda_1/lambda_5.

    python bench/accuracy.py                    # = make bench-accuracy: the default grid, seeds 0-5, then the figures
    python bench/accuracy.py --more             # + SSAM-F 0.9/0.99, tensor masks, SAM-ON
    python bench/accuracy.py --cheaper          # + the cheaper ascents of issue 11, each paired with its exact method
    python bench/accuracy.py --seeds 0 1 2      # the selection seeds only
    python bench/accuracy.py -- --epochs 2      # any train.py flag after --, appended to SETTING (marked in names)

Runs go through train.py's run_grid (one naming and "done" rule with the demo and scripts/reproduce.py): a run
whose final.json records the same config is reused, anything else is trained; runs/bench-accuracy/<name>/.
Writes bench/results/accuracy.json and accuracy.md; bench/plots.py draws the figures from the JSON.

--cheaper (issue 11): cost-aware tensor masks (SSAM-F/SSAM-D 0.9, --structure tensor --mask-select cost), SAM's
ascent on part of the batch (--ascent-fraction 0.25, 0.5) and both together, each with a paired difference (same
seed) to the exact method it approximates (CHEAPER_REF). Decision rule, fixed before any of these runs: a cheaper
method keeps its exact method's accuracy when the paired Δ's 95% CI over all 6 seeds includes 0 and its mean is
above −1 point; it gains when the whole CI is above 0; it loses accuracy when the whole CI is below 0; otherwise
undecided. Nothing was tuned for these methods, so all 6 seeds are confirmation runs; seeds 0-2 and 3-5 are still
shown apart.

Method names: <optimizer>[-tensor|-cost][-f<fraction>]: "-tensor" = --structure tensor (the paper's ranking),
"-cost" = --structure tensor --mask-select cost, "-f0.25" = --ascent-fraction 0.25 (method_flags, method_of).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import common  # noqa: E402
import sharpness  # noqa: E402

import train  # noqa: E402

# The setting (README "Accuracy: protocol", fixed before any of its runs): WRN-10-1 on 256 training images, 40% of
# them with a wrong label, no Cutout, 80 epochs at batch 32 (640 steps). A one-seed probe (512 images, 100 epochs)
# had SGD fit 81% of its labels, memorize 75% of the wrong ones, and lose 4.3 points to SAM; at 50 epochs neither
# fit (SGD 47%) and they tied; this setting halves the images and keeps most of the steps (640 of 800).
SETTING = [
    "--preset",
    "cifar10-subset",
    "--model",
    "wrn10-1",
    "--train-size",
    "256",
    "--label-noise",
    "0.4",
    "--cutout",
    "0",
    "--epochs",
    "80",
    "--batch-size",
    "32",
    "--eval-every",
    "40",
]
METHODS = [("sgd", None), ("sam", None), ("ssamf", 0.5), ("ssamd", 0.5), ("ssamd", 0.9)]
MORE = [("ssamf", 0.9), ("ssamf", 0.99), ("ssamf-tensor", 0.9), ("ssamd-tensor", 0.9), ("samon", None)]
CHEAPER = [
    ("ssamf", 0.9),
    ("ssamf-cost", 0.9),
    ("ssamd-cost", 0.9),
    ("sam-f0.25", None),
    ("sam-f0.5", None),
    ("ssamf-cost-f0.25", 0.9),
    ("ssamf-cost-f0.5", 0.9),
]
CHEAPER_REF = {
    ("ssamf-cost", 0.9): ("ssamf", 0.9),
    ("ssamd-cost", 0.9): ("ssamd", 0.9),  # the exact method
    ("sam-f0.25", None): ("sam", None),
    ("sam-f0.5", None): ("sam", None),  # each one approximates
    ("ssamf-cost-f0.25", 0.9): ("ssamf-cost", 0.9),
    ("ssamf-cost-f0.5", 0.9): ("ssamf-cost", 0.9),
}
KEEPS_ABOVE = -1.0  # decision rule (module docstring): "keeps" needs the paired Δ's mean above -1 point
SEED_SETS = {"seeds 0-2": [0, 1, 2], "seeds 3-5 (the confirmation set)": [3, 4, 5]}
LANCZOS = dict(
    batch=128, iters=20
)  # lambda_5 within 2% of 40 steps (bench/sharpness.py); lambda_1 converges first
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
}  # Student t, two-sided 95%, by degrees of freedom


def parse_method(method):
    """'<optimizer>[-tensor|-cost][-f<fraction>]' -> (optimizer, masks: None / 'tensor' / 'cost', fraction or None)."""
    opt, *rest = method.split("-")
    masks = rest.pop(0) if rest and rest[0] in ("tensor", "cost") else None
    fraction = float(rest.pop(0)[1:]) if rest and rest[0].startswith("f") and rest[0][1:] else None
    if rest or not opt:
        raise ValueError(f"method {method!r}: expected <optimizer>[-tensor|-cost][-f<fraction>]")
    return opt, masks, fraction


def method_flags(method, sparsity):
    """-> train.py flags. '-tensor': whole-tensor masks (--structure tensor); '-cost': the same with cost-aware
    selection (--mask-select cost); '-f<x>': the ascent pass on the first x of each batch (--ascent-fraction x)."""
    opt, masks, fraction = parse_method(method)
    f = ["--optimizer", opt] + ([] if sparsity is None else ["--sparsity", str(sparsity)])
    f += [] if masks is None else ["--structure", "tensor"]
    f += ["--mask-select", "cost"] if masks == "cost" else []
    return f + ([] if fraction is None else ["--ascent-fraction", f"{fraction:g}"])


def method_of(cfg):
    """The run config (train.resolve_config: flags at their default may be absent) -> (method, sparsity)."""
    structure = cfg.get("structure", "unstructured")
    if structure not in ("unstructured", "tensor"):
        raise ValueError(f"--structure {structure} has no method name in bench/accuracy.py")
    masks = (
        "" if structure != "tensor" else "-cost" if cfg.get("mask_select", "paper") == "cost" else "-tensor"
    )
    fraction = cfg.get("ascent_fraction", 1.0)
    return cfg["optimizer"] + masks + ("" if fraction == 1.0 else f"-f{fraction:g}"), cfg.get("sparsity")


def verdict(delta):
    """The decision rule for a cheaper method (module docstring) on its paired Δ = (mean, ci, n) to the exact
    method: 'keeps' (CI includes 0, mean > -1 point), 'gains' (whole CI above 0), 'loses' (whole CI below 0),
    otherwise 'undecided'. None without a CI (no Δ, or a single paired seed)."""
    if delta is None or delta[2] < 2:
        return None
    m, h = delta[:2]
    if m - h <= 0 <= m + h and m > KEEPS_ABOVE:
        return "keeps"
    return "loses" if m + h < 0 else "gains" if m - h > 0 else "undecided"


def mean_ci(values):
    """-> (mean, half-width of the 95% confidence interval of the mean; nan for one value)."""
    n = len(values)
    m = statistics.mean(values)
    return m, (T975[n - 1] * statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan"))


def analyze(cfg, with_sharpness):
    """Train accuracy without augmentation (against the labels trained on, and the true ones) and the Hessian's
    top eigenvalues; cached in <run>/analysis.json next to the checkpoint it was computed from."""
    out_dir = Path(cfg["out_dir"])
    cache = out_dir / "analysis.json"
    stamp = os.path.getmtime(out_dir / "ckpt.pt")
    a = json.loads(cache.read_text()) if cache.exists() else {}
    if a.get("ckpt_mtime") != stamp or a.get("lanczos") != LANCZOS:
        a = dict(ckpt_mtime=stamp, lanczos=LANCZOS)
    model, _ = sharpness.load_run(out_dir / "ckpt.pt", "cpu")
    if "train_acc_clean_eval" not in a:
        data = train.CifarOnDevice(dict(cfg, batch_size=1), torch.device("cpu"), 0, 1)
        true_y = train.CifarOnDevice(
            dict(cfg, batch_size=1, label_noise=0.0), torch.device("cpu"), 0, 1
        ).train_y
        with torch.no_grad():
            pred = torch.cat(
                [
                    model(train.normalize(data.train_x[i : i + 500])).argmax(1)
                    for i in range(0, len(data.train_y), 500)
                ]
            )
        wrong = data.train_y != true_y
        a["train_acc_eval"] = (pred == data.train_y).float().mean().item()  # the labels it was trained on
        a["train_acc_clean_eval"] = (pred == true_y).float().mean().item()  # the true labels
        a["memorized_noisy"] = (
            (pred[wrong] == data.train_y[wrong]).float().mean().item() if wrong.any() else None
        )
    if with_sharpness and "eigenvalues" not in a:
        x, y = sharpness.train_batch(cfg, LANCZOS["batch"], "cpu")
        a["eigenvalues"] = sharpness.top_eigenvalues(model, x, y, k=5, iters=LANCZOS["iters"])
    cache.write_text(json.dumps(a, indent=1) + "\n")
    return a


def summarize(runs, seeds):
    """Rows per method over `seeds`: test accuracy mean ± CI, paired differences (same seed) to SGD, to SAM and,
    for a cheaper method (CHEAPER_REF), to the exact method it approximates: vs_ref = (mean, ci, n) or None,
    ref = that method's label; the median step time (ms) of its runs."""
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
            diffs = [acc[s] - 100 * other[s]["test_acc"] for s in sorted(rs) if s in other]
            return mean_ci(diffs) + (len(diffs),) if diffs else None

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


def label(method, sp):
    """e.g. 'SSAM-F 0.5', 'SSAM-D tensor 0.9', 'SSAM-F cost-aware 0.9, f=0.25', 'SAM f=0.5'."""
    opt, masks, fraction = parse_method(method)
    text = dict(sgd="SGD", sam="SAM", ssamf="SSAM-F", ssamd="SSAM-D", samon="SAM-ON")[opt]
    text += dict(tensor=" tensor", cost=" cost-aware").get(masks, "") + ("" if sp is None else f" {sp:g}")
    return text + ("" if fraction is None else ("," if sp is not None else "") + f" f={fraction:g}")


def render(result):
    s, m = result["settings"], result["machine"]
    lines = [
        "# Accuracy: SGD, SAM, SSAM-F, SSAM-D where the model fits its training data",
        "",
        f"train.py {' '.join(s['setting'])}, one run per method and seed (runs/bench-accuracy/). Test accuracy on "
        f"the full CIFAR-10 test split (10,000 images). {len(result['runs'])} runs; wall time of this "
        f"invocation {result['wall_s'] / 60:.1f} min ({result['trained']} trained, the rest reused), "
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
    for title, seeds in seed_sets.items():
        rows = [r for r in result["summary"][title]]
        if not rows:
            continue
        judged = cheaper and title == widest
        lines += [
            f"## {title}",
            "",
            "| method | test acc % (mean ± 95% CI) | paired Δ vs SGD | paired Δ vs SAM | "
            + ("paired Δ vs its exact method | " if cheaper else "")
            + ("verdict | " if judged else "")
            + "train acc, no aug. (labels trained on / true) | wrong labels memorized | λ1 | λ1/λ5 | "
            "step ms (median) | per seed |",
            "|---|---|---|---|" + "---|" * (cheaper + judged) + "---|---|---|---|---|---|",
        ]
        for r in rows:
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
                d.append("–" if r.get("vs_ref") is None else verdict(r["vs_ref"]) or "– (1 seed)")
            fit = (
                "–"
                if r["train_acc_eval"] is None
                else f"{r['train_acc_eval']:.1f} / {r['train_acc_clean_eval']:.1f}"
            )
            mem = "–" if r["memorized_noisy"] is None else f"{r['memorized_noisy']:.1f}%"
            lam = (
                "–"
                if r["lambda_1"] is None
                else fmt_ci(*r["lambda_1"][:2], digits=1) + f" (n={r['lambda_1'][2]})"
            )
            rat = "–" if r["lambda_ratio"] is None else fmt_ci(*r["lambda_ratio"][:2], digits=2)
            ms = "–" if r.get("step_ms") is None else f"{r['step_ms']:.0f}"
            lines.append(
                f"| {label(r['method'], r['sparsity'])} | {fmt_ci(r['mean'], r['ci'])} | {' | '.join(d)} | "
                f"{fit} | {mem} | {lam} | {rat} | {ms} | {', '.join(f'{a:.2f}' for a in r['per_seed'])} |"
            )
        lines.append("")
    lines += [
        "95% CI: t-distribution over seeds (n = 3: mean ± 4.30·sd/√3). Paired Δ: the method minus SGD (or SAM) "
        "with the same seed (same initialization and data order), mean ± 95% CI over seeds; a difference is "
        "beyond noise when its CI excludes 0. One test image is 0.01 point; the binomial sampling noise of "
        "10,000 images is ±0.85 point (95%) for one accuracy near 25%, and less for a paired difference on "
        "the same images. Train accuracy: the final model in eval mode on its training images, "
        "without augmentation. λ1, λ1/λ5: Hessian of the training loss (the labels trained on) at the final "
        f"weights, {LANCZOS['iters']} Lanczos steps on {LANCZOS['batch']} training images, eval mode. "
        f"Step ms: the median over the method's runs of each run's median ms per training step; the runs "
        f"shared the machine's {m['cores']} cores, {s['jobs']} at a time (and with whatever else ran), so "
        "step times are indicative only: the controlled step-time ratios are in bench/results/throughput.md.",
        "",
    ]
    if cheaper:
        lines += [
            "Cheaper methods (issue 11): paired Δ vs its exact method = the cheaper method minus the method it "
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
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5], help="default 0-5")
    ap.add_argument(
        "--more", action="store_true", help="also SSAM-F 0.9/0.99, tensor masks (SSAM-F/D 0.9), SAM-ON"
    )
    ap.add_argument(
        "--cheaper",
        action="store_true",
        help="also the cheaper ascents of issue 11 (cost-aware masks SSAM-F/D 0.9, SAM --ascent-fraction "
        "0.25/0.5, both together) and SSAM-F 0.9, each paired with the exact method it approximates",
    )
    ap.add_argument(
        "--sharpness-seeds",
        type=int,
        nargs="*",
        default=[0, 1, 2],
        help="runs whose Hessian is measured (20 products each; default 0 1 2)",
    )
    ap.add_argument(
        "--jobs", type=int, default=2, help="train.py processes at a time, one thread each (default 2)"
    )
    ap.add_argument("--fresh", action="store_true", help="train every run again")
    ap.add_argument(
        "--report", action="store_true", help="train nothing: summarize the runs that have finished"
    )
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-accuracy"))
    ap.add_argument("--out", default=str(HERE / "results" / "accuracy"), help="writes OUT.json and OUT.md")
    ap.add_argument("train_args", nargs="*", help="after --: more train.py flags, appended to SETTING")
    args = ap.parse_args()
    setting = SETTING + args.train_args
    machine = common.machine()
    methods = list(dict.fromkeys(METHODS + (MORE if args.more else []) + (CHEAPER if args.cheaper else [])))
    grid = [
        setting + method_flags(mth, sp) + ["--seed", str(seed)]  # seed by seed: a cut-short grid is balanced
        for seed in args.seeds
        for mth, sp in methods
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    t0 = time.perf_counter()
    cfgs = [train.grid_run(f, args.runs_dir)[0] for f in grid]
    missing = [c["name"] for c in cfgs if train.run_state(c) != "done"]
    if args.report:
        done, todo = (
            [
                (c, json.loads((Path(c["out_dir"]) / "final.json").read_text()))
                for c in cfgs
                if c["name"] not in missing
            ],
            0,
        )
        print(
            "\n".join(["not finished, left out:"] + missing) if missing else "all runs finished",
            file=sys.stderr,
        )
    else:
        todo = len(grid) if args.fresh else len(missing)
        done = train.run_grid(
            grid, args.runs_dir, fresh=args.fresh, launch=[sys.executable], jobs=args.jobs, env=env
        )
        missing = []
    torch.set_num_threads(max(1, args.jobs))
    runs = []
    for cfg, final in done:
        method, sp = method_of(cfg)
        a = analyze(cfg, cfg["seed"] in args.sharpness_seeds)
        metrics = [
            {k: m.get(k) for k in ("epoch", "loss", "acc", "test_acc")}
            for m in map(json.loads, filter(str.strip, open(Path(cfg["out_dir"]) / "metrics.jsonl")))
        ]  # the curves' keys only: a small JSON
        runs.append(
            dict(
                method=method,
                sparsity=sp,
                seed=cfg["seed"],
                name=cfg["name"],
                test_acc=final["test_acc"],
                time_s=final["time_s"],
                step_ms=final["step_ms"],
                metrics=metrics,
                **{
                    k: a.get(k)
                    for k in ("train_acc_eval", "train_acc_clean_eval", "memorized_noisy", "eigenvalues")
                },
            )
        )
    seed_sets = {t: [s for s in ss if s in args.seeds] for t, ss in SEED_SETS.items()}
    seed_sets = {t: ss for t, ss in seed_sets.items() if ss}
    if len(seed_sets) > 1:
        seed_sets[f"all seeds ({', '.join(map(str, args.seeds))})"] = list(args.seeds)
    elif not seed_sets:
        seed_sets = {f"seeds {', '.join(map(str, args.seeds))}": list(args.seeds)}
    result = dict(
        settings=dict(
            setting=setting,
            seeds=args.seeds,
            jobs=args.jobs,
            lanczos=LANCZOS,
            title="wrn10-1, 256 CIFAR-10 images, 40% wrong labels, 80 epochs"
            if not args.train_args
            else " ".join(setting[2:]),
        ),
        machine=machine,
        wall_s=time.perf_counter() - t0,
        trained=todo,
        seed_sets=seed_sets,
        missing=[f"{label(*method_of(c))} seed {c['seed']}" for c in cfgs if c["name"] in missing],
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
