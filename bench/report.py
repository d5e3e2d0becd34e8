"""bench/results/throughput.json (pytest-benchmark) -> bench/results/throughput.md: step time of each method
as a multiple of SGD's, next to the FLOP bound the method could reach and the paper's FLOPs column (Tables
1-3), the mask-update costs, the optimizer memory, and the targets marked PASS, MISS or UNDECIDED.

    python bench/report.py [bench/results/throughput.json] [-o bench/results/throughput.md]

Every method runs once per round and the methods of a round run seconds apart (bench/test_throughput.py), so a
ratio between two methods is taken per round, where load from other jobs hits both alike, and reported as the
median over rounds with a bootstrap 95% interval (percentiles of the median of 2,000 resamples of the rounds).
A target is PASS when the whole interval meets it, MISS when the whole interval misses it, UNDECIDED
otherwise (lab/stats.py holds these statistics).
"""

import argparse
import json
import os
import sys

from bench import common
from lab.methods import METHODS, SPARSE, split
from lab.stats import estimate, interval, median, target_verdict

HERE = os.path.dirname(os.path.abspath(__file__))
SAM_LIMIT = 2.05  # SAM's step <= 2.05x SGD's: two passes and a little bookkeeping, nothing more
SSAM_LIMIT = 1.02  # an element-wise/N:M SSAM non-update step <= 1.02x SAM's: the mask costs one multiply
COST_MASK_LIMIT = 1.45  # cost-aware whole-tensor SSAM at 90% sparsity <= 1.45x SGD (bound: ~1.33x)
ASCENT_LIMIT = 1.35  # SAM with the ascent on a quarter of the batch <= 1.35x SGD (bound: 1.25x)
AMORTIZED_LIMIT = 0.01  # mask updates at the paper's interval < 1% of training time


def per_round(a, b, fn=lambda ta, tb: ta / tb):
    """fn of a's and b's time in every round both ran, in round order."""
    return [fn(a["t"][r], b["t"][r]) for r in sorted(a["t"]) if r in b["t"]]


def median_ms(row):
    return 1e3 * median(list(row["t"].values()))


# ----------------------------------------------------------------------------------------------------------
# The numbers behind the report


def collect(benchmarks):
    """{key: row}: row["t"] = {round: seconds a step (fastest timed call of that round, over the steps of
    its period: --ascent-every k times k steps)}, plus the extra_info of
    all rounds (round 0 alone holds the memory and FLOP measurements)."""
    rows = {}
    for b in sorted(benchmarks, key=lambda b: b["extra_info"].get("bench_round", 0)):
        e = b["extra_info"]
        key = {
            "step": lambda: ("step", e["model"], e["batch"], e["method"]),
            "first_step": lambda: ("first_step", e["model"], e["method"]),
            "fisher": lambda: ("update", e["model"], "fisher"),
            "mask-update": lambda: ("update", e["model"], f"{e['opt']}-update_mask"),
        }.get(e.get("kind"))
        if key is None:
            continue
        row = rows.setdefault(key(), dict(t={}))
        row.update({k: v for k, v in e.items() if k != "bench_round"})
        row["t"][e.get("bench_round", 0)] = b["stats"]["min"] / e.get("period", 1)  # per step
    return rows


def group(benchmarks):
    """-> steps {(model, batch): {method: row}}, first {model: {method: row}}, updates {model: {what: row}}"""
    steps, first, updates = {}, {}, {}
    for key, row in collect(benchmarks).items():
        at = key[1:3] if key[0] == "step" else key[1]  # (model, batch) or model
        dict(step=steps, first_step=first, update=updates)[key[0]].setdefault(at, {})[key[-1]] = row
    return steps, first, updates


def method(name):
    """A benchmark's method name -> (its entry of lab/methods.py METHODS, its sparsity)."""
    m, sparsity = split(name.removesuffix("@trained"))
    return METHODS[m], sparsity


def paper_flops(name):
    """The paper's theoretical cost relative to SGD (None where the paper has no number for the method)."""
    m, sparsity = method(name)
    return None if m["flops"] is None else m["flops"].get(sparsity)


def target(out, text, values, limit, at_most=True, fmt="{:.3f}x"):
    m, lo, hi = estimate(values) if isinstance(values, list) else values
    out.append(
        dict(
            target=text,
            median=m,
            lo=lo,
            hi=hi,
            rounds=len(values) if isinstance(values, list) else None,
            value=f"{fmt.format(m)} [{fmt.format(lo)}, {fmt.format(hi)}]",
            verdict=target_verdict(lo, hi, limit, at_most),
        )
    )


def step_rows(model, batch, rows):
    """The step table's rows of one model and batch: ms, x SGD with its interval, x SAM, FLOP bounds."""
    sgd, sam = rows.get("sgd"), rows.get("sam")
    return [
        dict(
            model=model,
            batch=batch,
            method=name,
            weights=r.get("weights", "fresh"),
            ms=median_ms(r),
            rounds=len(r["t"]),
            x_sgd=estimate(per_round(r, sgd)) if sgd else None,
            x_sam=median(per_round(r, sam)) if sam else None,
            flops=r.get("flops_x_sgd"),
            paper=paper_flops(name),
            density=r.get("density"),
            memory=r.get("memory"),
            param_bytes=r["param_bytes"],
        )
        for name, r in rows.items()
    ]


def step_targets(out, where, rows, fs):
    """The step-time targets of one model and batch: SAM, the quarter-batch ascent, the cost-aware masks, and
    the element-wise SSAM steps against SAM's (from first_step alone, fs)."""
    sgd, sam = rows.get("sgd"), rows.get("sam")
    if sgd and sam:
        target(out, f"{where}: SAM step <= {SAM_LIMIT}x SGD", per_round(sam, sgd), SAM_LIMIT)
    for name, r in rows.items():
        m, sparsity = method(name)
        s = m["settings"]
        if not sgd or s["optimizer"] == "sgd":
            continue
        if s.get("ascent_fraction") == 0.25 and s["optimizer"] == "sam":
            text = f"{where}: {name} (SAM, ascent on 1/4 of the batch) <= {ASCENT_LIMIT}x SGD"
            target(out, text, per_round(r, sgd), ASCENT_LIMIT)
        if s.get("mask_select") == "cost" and sparsity == 0.9 and "ascent_fraction" not in s:
            text = f"{where}: {name} ({r['weights']} weights) <= {COST_MASK_LIMIT}x SGD"
            target(out, text, per_round(r, sgd), COST_MASK_LIMIT)
    for name, r in fs.items():
        if sam and name != "sam" and "sam" in fs:
            # A non-update element-wise SSAM step runs SAM's code plus eps ⊙ m inside first_step: per round,
            # SAM's step plus the first_step difference is SSAM's step without the noise of a whole step.
            sam_t = per_round(sam, sam, lambda a, _: a)
            x = [(s + d) / s for s, d in zip(sam_t, per_round(r, fs["sam"], lambda a, b: a - b))]
            text = f"{where}: {name} non-update step <= {SSAM_LIMIT}x SAM (from first_step)"
            target(out, text, x, SSAM_LIMIT, fmt="{:.4f}x")


def first_step_rows(first, steps):
    """first_step alone per model and method, and its difference to SAM's as a share of SAM's whole step."""
    out = []
    for model, fs in first.items():
        sam_step = next((rows["sam"] for (m, _), rows in steps.items() if m == model and "sam" in rows), None)
        for name, r in fs.items():
            delta = median(per_round(r, fs["sam"], lambda a, b: a - b)) if "sam" in fs else None
            share = delta / median(list(sam_step["t"].values())) if delta is not None and sam_step else None
            out.append(
                dict(
                    model=model,
                    method=name,
                    ms=median_ms(r),
                    rounds=len(r["t"]),
                    delta_ms=None if delta is None else 1e3 * delta,
                    of_sam_step=share,
                )
            )
    return out


def update_rows(model, u, rows, targets):
    """The mask-update rows of one model (and their amortized-share targets, appended to targets)."""
    out = []
    for opt in SPARSE:
        upd = u.get(f"{opt}-update_mask")
        step = next((r for r in rows.values() if r.get("opt") == opt), None)  # a non-update step of opt
        if not upd:
            continue
        row = dict(model=model, what=f"{opt} update_mask", ms=median_ms(upd), rounds=len(upd["t"]))
        if step:
            steps = common.steps_per_epoch(step["batch"])  # once an epoch: 391 steps at batch 128

            def share(tu, ts):
                return median(tu) / steps / median(ts)

            tu, ts = list(upd["t"].values()), list(step["t"].values())
            m, (lo, hi) = share(tu, ts), interval([tu, ts], share)
            row.update(interval=steps, step_ms=1e3 * median(ts), step=step["method"], amortized=m)
            text = (
                f"{model}: {opt} mask updates once an epoch ({steps} steps at batch {step['batch']}, "
                f"{step['method']} steps) < {AMORTIZED_LIMIT:.0%} of training"
            )
            target(targets, text, (m, lo, hi), AMORTIZED_LIMIT, fmt="{:.3%}")
        out.append(row)
    if u.get("fisher"):
        r = u["fisher"]
        what = f"Fisher (ssam.empirical_fisher), {r['num_samples']} samples"
        out.append(dict(model=model, what=what, ms=median_ms(r), rounds=len(r["t"])))
    return out


def summarize(data):
    """The numbers behind the report, as plain dicts (tests check these). `data`: the loaded JSON."""
    steps, first, updates = group(data["benchmarks"])
    out = dict(steps=[], first_steps=first_step_rows(first, steps), updates=[], targets=[])
    for (model, batch), rows in steps.items():
        out["steps"] += step_rows(model, batch, rows)
        step_targets(out["targets"], f"{model} b{batch}", rows, first.get(model, {}))
    for model, u in updates.items():
        rows = next((rows for (m, _), rows in steps.items() if m == model), {})
        out["updates"] += update_rows(model, u, rows, out["targets"])
    return out


# ----------------------------------------------------------------------------------------------------------
# Markdown


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def render_head(data, source):
    m = data.get("machine_info", {}).get("bench", {})
    device = sorted({b["extra_info"]["device"] for b in data["benchmarks"]})
    return [
        "# Throughput: SGD, SAM, SSAM-F, SSAM-D, SAM-ON",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores ({m.get('threads', '?')} torch threads)"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; torch {m.get('torch', '?')}; device "
        + ", ".join(device)
        + f"; load average {m.get('loadavg', '?')} at the start, "
        f"{m.get('loadavg_end', '?')} at the end (1, 5, 15 min); "
        f"OMP_WAIT_POLICY {m.get('omp_wait_policy', '?')}.",
        f"Source: `{source}` ({data.get('datetime', '?')}). Every ratio is the median over rounds of the "
        "ratio within a round, with its bootstrap 95% interval in brackets; ms: the median over rounds.",
        "",
    ]


def render_steps(s):
    lines = [
        "## One training step (train.train_step)",
        "",
        "| model | batch | method | weights | ms/step | x SGD [95% interval] | FLOP bound x SGD | "
        "paper FLOPs x SGD | x SAM | density | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["steps"]:
        x = r["x_sgd"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['method']} | {r['weights']} | {r['ms']:.1f} | "
            + (f"{x[0]:.2f} [{x[1]:.2f}, {x[2]:.2f}]" if x else "-")
            + f" | {fmt(r['flops'], '.2f')} | {fmt(r['paper'], '.2f')} | {fmt(r['x_sam'], '.3f')} | "
            f"{fmt(r['density'], '.3f')} | {r['rounds']} |"
        )
    return lines + [
        "",
        "FLOP bound: the step's multiply-adds as a multiple of SGD's, counted per layer with hooks "
        "(bench/common.py pass_macs: forward 1 unit, input gradient 1, weight gradient 1; the ascent pass "
        "with the tensors `ascent_pass()` freezes and on the `--ascent-fraction` of the batch): what the "
        "method's kernels could reach (dense: `--sparse-ascent`'s 2:4 input gradients are counted in full). "
        "The paper's column counts a sparse perturbation as proportionally cheaper (Tables 1-3, footnote 4); "
        "dense kernels do the same work whatever an element-wise mask says. "
        "density: the share of weights perturbed. weights: the seed-0 init, or after a few SGD steps on the "
        "CIFAR-10 subset (`trained`).",
        "",
    ]


def render_first_and_updates(s):
    lines = [
        "## first_step alone (the only code where a non-update element-wise SSAM step differs from SAM's)",
        "",
        "| model | method | first_step ms | minus SAM's, ms | as a share of SAM's whole step | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for r in s["first_steps"]:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['ms']:.2f} | {fmt(r['delta_ms'], '+.2f')} | "
            f"{fmt(r['of_sam_step'], '+.2%')} | {r['rounds']} |"
        )
    lines += [
        "",
        "## Mask updates",
        "",
        "| model | what | ms | interval (steps) | step ms | amortized share of training | rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in s["updates"]:
        lines.append(
            f"| {r['model']} | {r['what']} | {r['ms']:.1f} | {r.get('interval', '-')} | "
            f"{fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('amortized'), '.3%')} | {r['rounds']} |"
        )
    return lines + [
        "",
        "amortized = update time / interval / step time; interval = one CIFAR epoch "
        f"({common.CIFAR_TRAIN_IMAGES} images) at the benchmark's batch, the paper's once-an-epoch schedule.",
        "",
    ]


def render_memory_and_targets(s):
    lines = [
        "## Optimizer memory (right after first_step)",
        "",
        "| model | method | total bytes | total MiB | x parameter bytes | masks MiB | momentum MiB | "
        "copy of w MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s["steps"]:
        if r["memory"] and r["weights"] == "fresh":
            mem, mb = r["memory"], 2**20
            lines.append(
                f"| {r['model']} | {r['method']} | {mem['total']:,} | {mem['total'] / mb:.1f} | "
                f"{mem['total'] / r['param_bytes']:.2f} | {mem['masks'] / mb:.1f} | "
                f"{mem['momentum'] / mb:.1f} | {mem['weight_copy'] / mb:.1f} |"
            )
    lines += [
        "",
        "Masks are torch.bool (1 byte an entry, 0.25x fp32 parameter bytes). Gradients are not counted.",
        "",
        "## Targets",
        "",
        "PASS: the whole 95% interval meets the target; MISS: the whole interval misses it; "
        "UNDECIDED: the interval straddles it (more --bench-rounds, or a quieter machine, decide it).",
        "",
        "| target | median [95% interval] | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['value']} | {t['verdict']} |" for t in s["targets"]]
    count = {v: sum(t["verdict"] == v for t in s["targets"]) for v in ("PASS", "MISS", "UNDECIDED")}
    return lines + [
        "",
        f"{count['PASS']} PASS, {count['MISS']} MISS, {count['UNDECIDED']} UNDECIDED of "
        f"{len(s['targets'])} targets.",
        "",
    ]


def render(data, source, also=()):
    """The loaded throughput JSON -> the Markdown report; source: the JSON's path as the report names it.
    also: (data, source) of other runs (make bench-frontier-throughput's), each adding its step table."""
    s = summarize(data)
    lines = render_head(data, source) + render_steps(s) + render_first_and_updates(s)
    lines += render_memory_and_targets(s)
    for d, src in also:  # another run: its own machine line and rounds, never mixed with the rows above
        head = render_head(d, src)
        lines += [f"# Steps timed in another run: `{src}`", "", *head[2:]] + render_steps(summarize(d))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", default=os.path.join(HERE, "results", "throughput.json"))
    ap.add_argument("-o", "--out", default=os.path.join(HERE, "results", "throughput.md"))
    ap.add_argument("--also", nargs="*", default=[], help="other runs' JSON: their step tables, appended")
    args = ap.parse_args()
    with open(args.json) as f:
        data = json.load(f)
    also = [(json.loads(open(p).read()), os.path.relpath(p)) for p in args.also]
    text = render(data, os.path.relpath(args.json), also)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"-> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
