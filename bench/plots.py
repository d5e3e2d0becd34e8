"""PNG plots from bench/accuracy.py's results or from a folder of train.py runs: accuracy_vs_sparsity.png
(the paper's Fig. 3: SSAM-F and SSAM-D against sparsity, SAM and SGD as horizontal lines) and
training_curves.png (Fig. 2: train loss and test accuracy per epoch, one line per method).

    python bench/plots.py                          # bench/results/accuracy.json -> bench/results/*.png
    python bench/plots.py runs/                    # every runs/*/ holding metrics.jsonl + final.json
    python bench/plots.py runs/ --out-dir /tmp/figs

Runs with the same method and sparsity (lab/methods.py) are seeds of one method: lines are their mean, bars
and bands the 95% confidence interval of that mean (lab/stats.py: t-distribution over seeds). Test accuracy
is drawn at the epochs where every seed of the method was evaluated (train.py --eval-every).
"""

import argparse
import glob
import json
import math
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lab.config import load_config
from lab.methods import METHODS, color, label, method_of
from lab.stats import mean_ci

HERE = os.path.dirname(os.path.abspath(__file__))


def load(source):
    """-> list of runs: dict(method, sparsity, seed, test_acc, metrics=[per-epoch dicts]), and a title."""
    if os.path.isfile(source):
        with open(source) as f:
            result = json.load(f)
        return result["runs"], result["settings"]["title"]
    runs = []
    for final_path in sorted(glob.glob(os.path.join(source, "**", "final.json"), recursive=True)):
        run_dir = os.path.dirname(final_path)
        if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            continue
        with open(final_path) as f:
            final = json.load(f)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
        cfg = load_config(final["config"], final_path)
        method, sparsity = method_of(cfg)
        runs.append(
            dict(
                method=method,
                sparsity=sparsity,
                seed=cfg.seed,
                test_acc=final["test_acc"],
                metrics=metrics,
                out_dir=run_dir,
                setting=f"{cfg.model}, {cfg.dataset}, {cfg.train_size or 'all'} images, "
                f"label noise {cfg.label_noise}, {cfg.epochs} epochs",
            )
        )
    if not runs:
        raise SystemExit(f"no runs found under {source} (expected <run>/final.json and <run>/metrics.jsonl)")
    # Runs of another model, dataset or length are not seeds of one method: plot the largest setting only.
    settings = sorted({r["setting"] for r in runs}, key=lambda k: -sum(r["setting"] == k for r in runs))
    for other in settings[1:]:
        print(
            f"skipping {sum(r['setting'] == other for r in runs)} run(s) of {other} (plotting {settings[0]})"
        )
    return [r for r in runs if r["setting"] == settings[0]], settings[0]


def mean_std(values):
    """-> mean and the half-width of its 95% confidence interval (0 for a single value: nothing to draw)."""
    m, h = mean_ci(values)
    return m, 0.0 if math.isnan(h) else h


def by_method(runs):
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["sparsity"]), []).append(r)
    return groups


def seeds_note(groups):
    n = {len(rs) for rs in groups.values()}
    return f"{min(n)} seed{'s' if max(n) > 1 else ''}" if len(n) == 1 else f"{min(n)}-{max(n)} seeds"


def plot_accuracy_vs_sparsity(runs, title, path):
    groups = by_method(runs)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for opt in ("sgd", "sam", "samon"):  # fixed-mask methods: a horizontal line and a band of ±1 std
        if (opt, None) in groups:
            m, s = mean_std([100 * r["test_acc"] for r in groups[(opt, None)]])
            ax.axhline(m, color=color(opt), ls="--", label=f"{label(opt)} ({m:.1f})")
            ax.axhspan(m - s, m + s, color=color(opt), alpha=0.12)
    sparsities = sorted({s for _, s in groups if s is not None})
    for opt in ("ssamf", "ssamd", "ssamf-tensor", "ssamd-tensor"):
        xs = [s for s in sparsities if (opt, s) in groups]
        if xs:
            stats = [mean_std([100 * r["test_acc"] for r in groups[(opt, s)]]) for s in xs]
            ax.errorbar(
                [100 * s for s in xs],
                [m for m, _ in stats],
                yerr=[s for _, s in stats],
                marker="o",
                capsize=3,
                color=color(opt),
                label=label(opt),
            )
    ax.set_xlabel("sparsity of the perturbation (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Accuracy vs sparsity\n{title}; mean ± 95% CI, {seeds_note(groups)}", fontsize=9)
    means = [statistics.mean(100 * r["test_acc"] for r in rs) for rs in groups.values()]
    ax.set_ylim(min(means) - 3, max(means) + 3)  # a 2-seed interval (t = 12.7) would flatten everything
    if sparsities:
        ax.set_xticks([100 * s for s in sparsities])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_curves(runs, title, path):
    groups = by_method(runs)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    known = list(METHODS)  # the legend's order: the table's
    order = sorted(
        groups, key=lambda k: (known.index(k[0]) if k[0] in known else len(known), k[0], k[1] or 0)
    )
    sparse_levels = sorted({s for _, s in groups if s is not None})
    for opt, sparsity in order:
        rs = groups[(opt, sparsity)]
        n = min(len(r["metrics"]) for r in rs)
        epochs = [r["metrics"][i]["epoch"] for r in rs[:1] for i in range(n)]
        c, name = color(opt), label(opt, sparsity)
        # one colour per optimizer; the SSAM sparsities by line style: solid, dashed, dotted, ...
        style = "-" if sparsity is None else ["-", "--", ":", "-."][sparse_levels.index(sparsity) % 4]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "test_acc")):
            scale = 100 if key == "test_acc" else 1
            at = [i for i in range(n) if all(r["metrics"][i].get(key) is not None for r in rs)]
            stats = [mean_std([scale * r["metrics"][i][key] for r in rs]) for i in at]
            xs, mean, ci = [epochs[i] for i in at], [m for m, _ in stats], [h for _, h in stats]
            ax.plot(xs, mean, color=c, ls=style, marker="." if key == "loss" else "o", ms=3, label=name)
            ax.fill_between(
                xs, [m - h for m, h in zip(mean, ci)], [m + h for m, h in zip(mean, ci)], color=c, alpha=0.08
            )
    ax_loss.set_ylabel("train loss (augmented batches, labels trained on)")
    ax_loss.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.set_ylabel("test accuracy (%)")
    finals = [statistics.mean(100 * r["test_acc"] for r in rs) for rs in groups.values()]
    ax_acc.set_ylim(min(finals) - 6, max(finals) + 4)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7, ncol=2)
    fig.suptitle(f"Training curves ({title}; mean ± 95% CI, {seeds_note(groups)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "source",
        nargs="?",
        default=os.path.join(HERE, "results", "accuracy.json"),
        help="accuracy.json from bench/accuracy.py, or a folder of train.py runs",
    )
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    runs, title = load(args.source)
    os.makedirs(args.out_dir, exist_ok=True)
    for name, plot in (
        ("accuracy_vs_sparsity.png", plot_accuracy_vs_sparsity),
        ("training_curves.png", plot_training_curves),
    ):
        plot(runs, title, os.path.join(args.out_dir, name))
        print(f"-> {os.path.join(args.out_dir, name)}")


if __name__ == "__main__":
    main()
