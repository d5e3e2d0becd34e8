"""The accuracy-vs-cost frontier of SAM's cheaper variants, each measured against SAM (bench/README.md,
"Frontier: SAM's accuracy at SGD's price"): x = step time as a multiple of SGD's (bench/test_throughput.py on
ResNet-18 and TinyViT, one run for every configuration), y = test accuracy minus SAM's, paired by seed, in
the accuracy setting of bench/accuracy.py (SETTING).

    python bench/frontier.py screen           # seeds 0-2, every configuration of SCREEN; picks CANDIDATES
    python bench/frontier.py confirm          # seeds 3-14: SGD, SAM and the candidates the screen picked
    python bench/frontier.py heldout          # seeds 15-20 on other data (--data-seed 1): SGD, SAM and what
                                              # the confirmation found (heldout_picks)
    python bench/frontier.py render           # frontier.json -> frontier.md and frontier.png, no runs needed
                                              # (--throughput's file, if there, replaces the JSON's costs)
    python bench/frontier.py screen --report  # train nothing: whatever has finished

Step costs come from --throughput (make bench-frontier-throughput writes it); a configuration it lacks gets
its FLOP bound only (marked). Runs go through train.py's run_grid (one naming and "done" rule with
bench/accuracy.py): finished runs are reused. Writes bench/results/frontier.json, .md, .png.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench import accuracy, common, report
from lab.grid import grid_run, run_grid, run_state
from lab.methods import METHODS, flags, label, method_of

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Fixed before any run: SGD, SAM, the project's cheaper SAMs, SAM-k and LookSAM-k (Liu et al., CVPR 2022;
# alpha 0.7, the paper's) for k in 2, 5, 10, and three combinations at or near 1.15x SGD's FLOPs. Within a
# seed the new configurations run first, so a screen cut short still pairs them with SAM.
SCREEN = [
    ("sgd", None),
    ("sam", None),
    ("sam-k2", None),
    ("sam-k5", None),
    ("sam-k10", None),
    ("sam-k2-a0.7", None),
    ("sam-k5-a0.7", None),
    ("sam-k10-a0.7", None),
    ("sam-f0.5-k5-a0.7", None),
    ("sam-f0.25-k2-a0.7", None),
    ("ssamf-tensor-cost-k2-a0.7", 0.9),
    ("ssamf", 0.5),
    ("ssamd", 0.5),
    ("ssamf-tensor-cost", 0.9),
    ("sam-f0.5", None),
    ("sam-f0.25", None),
]
# The second screen round, added after the first round's results and before any confirmation run: LookSAM at
# alpha 0.1 and 0.3 (alpha 0.7 collapsed training at k = 5 and 10), chosen on the screen seeds as the rule
# allows.
SCREEN += [("sam-k5-a0.1", None), ("sam-k5-a0.3", None), ("sam-k10-a0.1", None), ("sam-k10-a0.3", None)]
STAGES = {"screen": [0, 1, 2], "confirm": list(range(3, 15)), "heldout": list(range(15, 21))}
HELDOUT = ["--data-seed", "1"]  # the held-out check: 256 other training images, another label-noise draw
GOAL = 1.15  # x SGD: the cost the issue asks SAM's accuracy at
KEEPS_ABOVE = -0.3  # the rule: a 95% CI of the paired difference to SAM that contains 0, and a mean >= -0.3
DROP_BELOW = -1.0  # candidates: a screen mean below this (points vs SAM) is not confirmed
MAX_CANDIDATES, MAX_GOAL = 6, 4
FLOOR = -6  # frontier.png's lowest y (points): lower points sit on it, their CIs (a few seeds: wide) cut


# ----------------------------------------------------------------------------------------------------------
# Costs: the throughput JSON, or the FLOP bound derived from the parent configuration


def costs(data):
    """{(method, sparsity): {model: dict(x=(median, lo, hi) or None, flops=bound)}} from a throughput JSON
    (pytest-benchmark's, as bench/report.py reads it); fresh weights only."""
    steps, _, _ = report.group(data["benchmarks"])
    out = {}
    for (model, batch), rows in steps.items():
        for r in report.step_rows(model, batch, rows):
            row = rows[r["method"]]
            if row.get("weights", "fresh") == "fresh":
                key = method_of(common.config(row["flags"]))
                out.setdefault(f"{key[0]}|{key[1]}", {})[model] = dict(x=r["x_sgd"], flops=r["flops"])
    return out


def timed_as(method, sp, table):
    """The configuration whose timing row a configuration uses: its own, or for LookSAM at another alpha
    without one, alpha 0.7's (alpha scales one vector: the same operations)."""
    a = METHODS[method]["settings"].get("looksam_alpha")
    if f"{method}|{sp}" in table or a in (None, 0.7):
        return method
    return method.replace(f"-a{a}", "-a0.7")


def cost_of(method, sp, table, model="resnet18"):
    """(x SGD or None, FLOP bound or None, measured?) of a configuration on `model`. Without its own row the
    bound comes from the configuration without -k: 1 + (bound - 1) / k, as common.flops_x_sgd counts."""
    row = table.get(f"{timed_as(method, sp, table)}|{sp}", {}).get(model)
    if row:
        return (row["x"][0] if row["x"] else None), row["flops"], row["x"] is not None
    k = METHODS[method]["settings"].get("ascent_every")
    parent = method.split("-k")[0] if k else None
    base = table.get(f"{parent}|{sp}", {}).get(model) if parent else None
    if method == "sgd":
        return 1.0, 1.0, False
    return None, (1 + (base["flops"] - 1) / k if base and base["flops"] else None), False


# ----------------------------------------------------------------------------------------------------------
# The rule and the candidates (bench/README.md, written before the runs)


def verdict(d, keeps_above=KEEPS_ABOVE):
    """The issue's rule on a paired difference to SAM d = (mean, ci, n): 'keeps' when the 95% CI contains 0
    and the mean is >= -0.3 points; 'beats' when the whole CI is above 0; else 'loses' (whole CI below 0)
    or 'misses' (the CI contains 0 but the mean is below -0.3). None without a CI."""
    if d is None or d[2] < 2:
        return None
    m, h = d[:2]
    if m - h > 0:
        return "beats"
    if m + h < 0:
        return "loses"
    return "keeps" if m >= keeps_above else "misses"


def front(points):
    """The Pareto front of (x, y, key): no other point is at most as costly and at least as accurate, with
    one of the two strictly. -> the keys on it, cheapest first."""
    on = [
        p
        for p in points
        if not any(q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in points)
    ]
    return [p[2] for p in sorted(on)]


def candidates(rows, table):
    """The confirmation candidates from the screen's rows (bench/README.md): configurations other than SGD and
    SAM with a screen mean of at least DROP_BELOW points vs SAM; up to MAX_GOAL of those whose ResNet-18
    FLOP bound is <= GOAL, best mean first; then, to MAX_CANDIDATES in all, the costlier ones on the screen's
    Pareto front (bound vs mean), cheapest first. Ties: the cheaper first."""
    pts = []
    for r in rows:
        if r["method"] in ("sgd", "sam") or r["vs_sam"] is None or r["vs_sam"][0] < DROP_BELOW:
            continue
        bound = cost_of(r["method"], r["sparsity"], table)[1]
        if bound is not None:
            pts.append((bound, r["vs_sam"][0], (r["method"], r["sparsity"])))
    goal = sorted((p for p in pts if p[0] <= GOAL), key=lambda p: (-p[1], p[0]))[:MAX_GOAL]
    rest = [k for k in front([p for p in pts if p[0] > GOAL])][: MAX_CANDIDATES - len(goal)]
    return [p[2] for p in goal] + rest


# ----------------------------------------------------------------------------------------------------------
# Runs and their summary


def heldout_picks(rows):
    """The configurations the held-out check runs besides SGD and SAM, from the confirmation's rows
    (bench/README.md): those that meet the goal; if none does, the cheapest that keeps (or beats) SAM's
    accuracy and the most accurate at <= GOAL x SGD (measured on ResNet-18, else the bound)."""
    rows = [r for r in rows if r["method"] not in ("sgd", "sam") and r["x"] is not None]
    ok = [r for r in rows if r["verdict"] in ("keeps", "beats")]
    cheap = [r for r in rows if r["x"] <= GOAL]
    picks = [r for r in ok if r in cheap]
    if not picks:
        picks = sorted(ok, key=lambda r: r["x"])[:1] + sorted(cheap, key=lambda r: -r["y"])[:1]
    return list(dict.fromkeys((r["method"], r["sparsity"]) for r in picks))


def train_or_reuse(methods, seeds, args, extra=()):
    """Trains the missing runs of methods x seeds, seed by seed (--report: none); extra: flags for every run.
    -> (done [(cfg, final)], labels of the runs not finished)."""
    grid = [accuracy.SETTING + flags(m, sp) + ["--seed", str(s), *extra] for s in seeds for m, sp in methods]
    if not args.report:
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
        run_grid(grid, args.runs_dir, launch=[sys.executable], jobs=args.jobs, env=env)
    cfgs = [grid_run(f, args.runs_dir)[0] for f in grid]
    done = [c for c in cfgs if run_state(c) == "done"]
    missing = [f"{label(*method_of(c))} seed {c.seed}" for c in cfgs if run_state(c) != "done"]
    return [(c, json.loads((Path(c.out_dir) / "final.json").read_text())) for c in done], missing


def summarize(runs, seeds, table):
    """Rows of the frontier over `seeds`: accuracy.summarize's (test accuracy, paired Δ to SGD and SAM) with
    each configuration's costs (ResNet-18, TinyViT), its verdict by the rule, whether it is on the front."""
    rows = [r for r in accuracy.summarize(runs, seeds) if (r["method"], r["sparsity"]) in SCREEN]
    rows.sort(key=lambda r: SCREEN.index((r["method"], r["sparsity"])))
    for r in rows:
        for model in ("resnet18", "vit"):
            x, bound, measured = cost_of(r["method"], r["sparsity"], table, model)
            r[model] = dict(x=x, bound=bound, measured=measured)
        r["timed_as"] = timed_as(r["method"], r["sparsity"], table)
        r["x"] = r["resnet18"]["x"] if r["resnet18"]["measured"] else r["resnet18"]["bound"]
        r["verdict"] = None if r["method"] == "sam" else verdict(r["vs_sam"])
        r["y"] = 0.0 if r["method"] == "sam" else r["vs_sam"][0] if r["vs_sam"] else None
    pts = [
        (r["x"], r["y"], (r["method"], r["sparsity"]))
        for r in rows
        if r["x"] is not None and r["y"] is not None
    ]
    on = front(pts)
    for r in rows:
        r["front"] = (r["method"], r["sparsity"]) in on
    return rows


# ----------------------------------------------------------------------------------------------------------
# The table and the figure


def fmt_ci(d):
    return "–" if d is None else accuracy.fmt_ci(*d[:2])


def fmt_cost(c):
    if c["measured"]:
        return f"{c['x']:.2f} (bound {c['bound']:.2f})"
    return "–" if c["bound"] is None else f"not measured (bound {c['bound']:.2f})"


def render_table(title, rows):
    lines = [
        f"## {title}",
        "",
        "| configuration | step x SGD, ResNet-18 | step x SGD, TinyViT | test acc % | paired Δ vs SAM | "
        "paired Δ vs SGD | verdict vs SAM | on the front | per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = " as α=0.7" if r["timed_as"] != r["method"] else ""  # its timing row: α=0.7's
        lines.append(
            f"| {label(r['method'], r['sparsity'])} | {fmt_cost(r['resnet18'])}{same} | "
            f"{fmt_cost(r['vit'])}{same} | "
            f"{accuracy.fmt_ci(r['mean'], r['ci'])} | {fmt_ci(r['vs_sam'])} | {fmt_ci(r['vs_sgd'])} | "
            f"{r['verdict'] or '–'} | {'yes' if r['front'] else ''} | "
            f"{', '.join(f'{a:.2f}' for a in r['per_seed'])} |"
        )
    return lines + [""]


def render(result):
    """frontier.json's content -> frontier.md; the rows computed again from its runs."""
    s, m, t = result["settings"], result["machine"], result["throughput"]
    lines = [
        "# Frontier: accuracy vs cost, each configuration against SAM",
        "",
        f"Accuracy: train.py {' '.join(s['setting'])} (bench/accuracy.py's setting), one run per "
        f"configuration and seed, test accuracy on the 10,000 CIFAR-10 test images; {s['jobs']} runs at a "
        f"time, one thread each, on {m['cpu']} ({m['cores']} cores); load average {m.get('loadavg', '?')} "
        "when this file was written.",
        f"Cost: {t['source']}" + (f" ({t['datetime']}, {t['machine']})" if t.get("datetime") else "") + ": "
        "the median over rounds of the step time over SGD's in the same round (bench/report.py); "
        "--ascent-every k is timed over whole periods of k steps. The bound: multiply-adds over SGD's "
        "(bench/common.py flops_x_sgd); where a configuration was not timed, only its bound is shown.",
        "",
    ]
    for stage, seeds in result["seed_sets"].items():
        rows = summarize(result["runs"], seeds, result["costs"])
        if rows:
            title = f"{stage}: seeds {seeds[0]}-{seeds[-1]}" + {
                "confirm": " (the confirmation seeds)",
                "heldout": f" ({' '.join(HELDOUT)}: training images and label noise the bench never saw)",
            }.get(stage, "")
            lines += render_table(title, rows)
    if result.get("missing"):
        lines += [f"Not finished, left out: {', '.join(result['missing'])}.", ""]
    cand = result.get("candidates")
    lines += [
        "Paired Δ: the configuration minus SAM (or SGD) with the same seed, mean ± 95% CI (t) over seeds, in "
        "points of test accuracy. Verdict (bench/README.md, fixed before the confirmation runs): **keeps** "
        f"SAM's accuracy when the CI contains 0 and the mean is >= {KEEPS_ABOVE}; **beats** it when the "
        "whole CI is above 0; **loses** when the whole CI is below 0; **misses** otherwise. Only the verdict "
        "on the confirmation seeds counts; on the screen seeds it is shown, not used. The front: no other "
        "configuration is cheaper (ResNet-18; the bound where not timed) and at least as accurate vs SAM.",
        "",
        "Candidates picked by the rule from the screen: "
        + (", ".join(label(*c) for c in cand) if cand else "none yet (the screen has not finished)")
        + ".",
        "",
    ]
    return "\n".join(lines)


def plot(result, path):
    """frontier.png: one panel per seed set, x = ResNet-18 step cost (hollow: the bound, not timed), y =
    paired Δ vs SAM with its 95% CI; the Pareto front drawn, the goal (1.15x SGD, -0.3 points) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lab.methods import color

    sets = [(st, ss) for st, ss in result["seed_sets"].items()]
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 5), squeeze=False)
    for ax, (stage, seeds) in zip(axes[0], sets):
        rows = [
            r
            for r in summarize(result["runs"], seeds, result["costs"])
            if r["x"] is not None and r["y"] is not None
        ]
        for r in rows:  # y below FLOOR: drawn on it as a triangle, its value in the label
            ci = 0 if r["method"] == "sam" or r["vs_sam"] is None else r["vs_sam"][1]
            face = color(r["method"]) if r["resnet18"]["measured"] else "none"
            y, text = (
                max(r["y"], FLOOR),
                label(r["method"], r["sparsity"]) + ("" if r["y"] >= FLOOR else f" ({r['y']:.1f})"),
            )
            low = r["y"] < FLOOR
            ax.errorbar(r["x"], y, yerr=0 if low or ci != ci else ci, fmt="v" if low else "o",
                        color=color(r["method"]), mfc=face, capsize=3)  # fmt: skip
            ax.annotate(text, (r["x"], y), fontsize=6, xytext=(4, 3), textcoords="offset points")
        ax.set_ylim(FLOOR - 0.5, 2.5)
        pts = sorted((r["x"], max(r["y"], FLOOR)) for r in rows if r["front"])
        if pts:
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="k", lw=1, alpha=0.6)
        ax.axvline(GOAL, ls=":", color="gray")
        ax.axhline(KEEPS_ABOVE, ls=":", color="gray")
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_title(f"{stage}: seeds {seeds[0]}-{seeds[-1]}")
        ax.set(xlabel="step time x SGD, ResNet-18 (hollow: FLOP bound, not timed)",
               ylabel="test accuracy − SAM's, paired (points)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------


def throughput(path):
    """(costs table, what the report says about its source) of a throughput JSON; empty when missing."""
    if not Path(path).exists():
        return {}, dict(source=f"{os.path.relpath(path, ROOT)} (missing: no step timed)")
    data = json.loads(Path(path).read_text())
    m = data.get("machine_info", {}).get("bench", {})
    info = dict(
        source=os.path.relpath(path, ROOT),
        datetime=data.get("datetime"),
        machine=f"{m.get('cpu', '?')}, load {m.get('loadavg', '?')} to {m.get('loadavg_end', '?')}",
    )
    return costs(data), info


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("screen", "confirm", "heldout", "render"))
    ap.add_argument("--report", action="store_true", help="train nothing: summarize what has finished")
    ap.add_argument("--jobs", type=int, default=2, help="train.py processes at a time, one thread each")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-frontier"))
    ap.add_argument("--throughput", default=str(HERE / "results" / "frontier-throughput.json"))
    ap.add_argument("--out", default=str(HERE / "results" / "frontier"), help="OUT.json, OUT.md, OUT.png")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out + ".json")
    old = json.loads(out.read_text()) if out.exists() else {}
    if args.stage == "render":
        if Path(args.throughput).exists():  # the step costs of a newer throughput run, into the JSON
            old["costs"], old["throughput"] = throughput(args.throughput)
            out.write_text(json.dumps(old, indent=1) + "\n")
        Path(args.out + ".md").write_text(render(old))
        plot(old, args.out + ".png")
        print(f"-> {args.out}.md, {args.out}.png", file=sys.stderr)
        return
    table, info = throughput(args.throughput)
    t0 = time.perf_counter()
    seeds, extra = STAGES[args.stage], HELDOUT if args.stage == "heldout" else []
    if args.stage == "screen":
        methods = SCREEN
    elif args.stage == "confirm":
        if not old.get("candidates"):
            raise SystemExit(f"{out}: no candidates yet; run the screen to its end first")
        methods = [("sgd", None), ("sam", None)] + [tuple(c) for c in old["candidates"]]
    else:
        rows = summarize(old.get("runs", []), STAGES["confirm"], table)  # costs: the timing file
        if not rows or any(len(r["per_seed"]) < len(STAGES["confirm"]) for r in rows):
            raise SystemExit(f"{out}: the confirmation has not finished; run it to its end first")
        picks = heldout_picks(rows)
        methods = [("sgd", None), ("sam", None)] + picks
    done, missing = train_or_reuse(methods, seeds, args, extra)
    runs = accuracy.collect(done, sharpness_seeds=[])
    keep = [r for r in old.get("runs", []) if r["seed"] not in seeds]  # the other stage's runs
    result = dict(
        settings=dict(setting=accuracy.SETTING, jobs=args.jobs),
        machine=common.machine(),
        throughput=info,
        costs=table,
        seed_sets={k: v for k, v in dict(old.get("seed_sets", {}), **{args.stage: seeds}).items()},
        runs=keep + [dict(r, metrics=None) for r in runs],
        missing=missing,
        candidates=old.get("candidates"),
        wall_s=time.perf_counter() - t0,
    )
    if args.stage == "screen" and not missing:  # the rule picks them once the whole screen has run
        result["candidates"] = candidates(summarize(runs, seeds, table), table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    text = render(result)
    Path(args.out + ".md").write_text(text)
    plot(result, args.out + ".png")
    print(text)
    print(f"-> {out}, {args.out}.md, {args.out}.png", file=sys.stderr)


if __name__ == "__main__":
    main()
