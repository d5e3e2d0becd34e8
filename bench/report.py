"""bench/results/throughput.json (pytest-benchmark) -> bench/results/throughput.md: step time of each method as a
multiple of SGD's in the same run, next to the paper's FLOPs column (Tables 1-3), the mask-update costs, the
optimizer memory, and the targets marked PASS or MISS.

    python bench/report.py [bench/results/throughput.json] [-o bench/results/throughput.md]

Times are each benchmark's fastest round ("min"): the timed work is the same every round, so anything slower is
the machine doing something else (other jobs on a shared box add time, never remove it). Ratios between methods
are paired by pass: the methods of one pass run seconds apart, so the median over passes of their ratio there
cancels load that comes and goes over minutes (see ratio()).
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]          # bench/ and the repo root (ssam.py)
import common  # noqa: E402
SAM_LIMIT = 2.05          # SAM's step <= 2.05x SGD's: two passes and a little bookkeeping, nothing more
SSAM_LIMIT = 1.02         # an SSAM non-update step <= 1.02x SAM's: the mask costs one multiply
AMORTIZED_LIMIT = 0.01    # mask updates at the paper's interval < 1% of training time
GPU_FISHER_SPEEDUP = 10   # batched Fisher >= 10x the batch-1 loop on a GPU (on a CPU: just faster)


def paper_flops(e):
    """The paper's theoretical cost relative to SGD for this method (None where the paper has no number)."""
    if e["opt"] == "sgd":
        return 1.0
    if e["opt"] == "samon":
        return None
    return common.PAPER_FLOPS.get(0.0 if e["opt"] == "sam" else e["sparsity"])


def verdict(ok):
    return "PASS" if ok else "MISS"


def merge_passes(benchmarks):
    """One entry per benchmark, its passes merged: the round times of all passes pooled; extra_info from all
    passes (the first alone holds the memory measurement). Returns {key: row}."""
    rows = {}
    for b in sorted(benchmarks, key=lambda b: b["extra_info"].get("bench_pass", 0)):
        e = b["extra_info"]
        if e.get("kind") == "step":
            key = ("step", e["model"], e["batch"], e["method"])
        elif e.get("kind") == "first_step":
            key = ("first_step", e["model"], e["method"])
        elif e.get("kind") == "fisher":
            key = ("update", e["model"], f"fisher-{e['impl']}")
        elif e.get("kind") == "mask-update":
            key = ("update", e["model"], f"{e['opt']}-update_mask")
        else:
            continue
        row = rows.setdefault(key, dict(data=[], pass_min={}))
        row.update(e)                                  # later passes carry no memory: the first pass's stays
        row["data"] += b["stats"].get("data") or [b["stats"]["min"]]
        row["pass_min"][e.get("bench_pass", 0)] = b["stats"]["min"]
    for row in rows.values():
        times = sorted(row["data"])
        row.update(min=times[0], median=times[len(times) // 2] if len(times) % 2 else
                   (times[len(times) // 2 - 1] + times[len(times) // 2]) / 2, rounds=len(times))
    return rows


def pass_ratios(a, b):
    """a's time over b's in each pass both ran in (fastest round of each), sorted."""
    return sorted(a["pass_min"][p] / b["pass_min"][p] for p in a["pass_min"] if p in b["pass_min"])


def ratio(a, b):
    """a's time over b's: the median over passes of the ratio of their fastest rounds in the same pass. The
    methods of a pass run within seconds of each other, so load that comes and goes cancels out."""
    rs = pass_ratios(a, b)
    if not rs:
        return a["min"] / b["min"]
    return rs[len(rs) // 2] if len(rs) % 2 else (rs[len(rs) // 2 - 1] + rs[len(rs) // 2]) / 2


def spread(a, b):
    """' (passes 0.97-1.05)': the lowest and highest per-pass ratio, so a reader sees the noise."""
    rs = pass_ratios(a, b)
    return f" (passes {rs[0]:.2f}-{rs[-1]:.2f})" if len(rs) > 1 else ""


def summarize(data):
    """The numbers behind the report, as plain dicts (tests check these). `data`: the loaded JSON."""
    steps, updates, first = {}, {}, {}
    for key, row in merge_passes(data["benchmarks"]).items():
        if key[0] == "step":
            steps.setdefault((key[1], key[2]), {})[key[3]] = row
        elif key[0] == "first_step":
            first.setdefault(key[1], {})[key[2]] = row
        else:
            updates.setdefault(key[1], {})[key[2]] = row
    out = dict(steps=[], first_steps=[], updates=[], targets=[])
    for (model, batch), rows in steps.items():
        sgd, sam = rows.get("sgd"), rows.get("sam")
        for name, r in rows.items():
            out["steps"].append(dict(model=model, batch=batch, method=name, ms=1e3 * r["min"], ms_median=1e3 * r["median"],
                                     x_sgd=ratio(r, sgd) if sgd else None,
                                     x_sgd_min=r["min"] / sgd["min"] if sgd else None,
                                     x_sam=ratio(r, sam) if sam else None, paper=paper_flops(r),
                                     memory=r.get("memory"), param_bytes=r["param_bytes"],
                                     patched_linear=r.get("patched_linear", 0), rounds=r["rounds"]))
        if sgd and sam:
            x = ratio(sam, sgd)
            out["targets"].append(dict(target=f"{model} b{batch}: SAM step <= {SAM_LIMIT}x SGD",
                                       value=f"{x:.3f}x" + spread(sam, sgd),
                                       ok=x <= SAM_LIMIT))
        fs = first.get(model, {})
        for name, r in rows.items():
            if not (sam and r["opt"] in ("ssamf", "ssamd")):
                continue
            x = ratio(r, sam)
            value = f"whole steps {x:.3f}x" + spread(r, sam)
            if name in fs and "sam" in fs:
                # A non-update SSAM step runs SAM's code plus eps ⊙ m inside first_step: SAM's step plus the
                # first_step difference, both from their fastest rounds, is SSAM's step without the noise.
                delta = fs[name]["min"] - fs["sam"]["min"]
                x = 1 + delta / sam["min"]
                value = f"{x:.4f}x from first_step (+{1e3 * delta:.1f} ms on SAM's {1e3 * sam['min']:.0f} ms); " + value
            out["targets"].append(dict(target=f"{model} b{batch}: {name} non-update step <= {SSAM_LIMIT}x SAM",
                                       value=value, ok=x <= SSAM_LIMIT))
    for model, fs in first.items():
        sam_step = next((rows.get("sam") for (m, _), rows in steps.items() if m == model), None)
        for name, r in fs.items():
            delta = r["min"] - fs["sam"]["min"] if "sam" in fs else None
            out["first_steps"].append(dict(model=model, method=name, ms=1e3 * r["min"], ms_median=1e3 * r["median"],
                                           rounds=r["rounds"], delta_ms=None if delta is None else 1e3 * delta,
                                           of_sam_step=delta / sam_step["min"] if delta is not None and sam_step
                                           else None))
    for model, u in updates.items():
        steps_here = [rows for (m, _), rows in steps.items() if m == model]
        for opt in ("ssamf", "ssamd"):
            upd, step = u.get(f"{opt}-update_mask"), steps_here and steps_here[0].get(f"{opt}-s0.5")
            if not upd:
                continue
            row = dict(model=model, what=f"{opt} update_mask", ms=1e3 * upd["min"], ms_median=1e3 * upd["median"],
                       rounds=upd["rounds"])
            if step:
                interval = common.steps_per_epoch(step["batch"])       # once an epoch: 391 steps at batch 128
                row.update(interval=interval, step_ms=1e3 * step["min"], batch=step["batch"],
                           amortized=upd["min"] / interval / step["min"])   # fastest of each: no pairing
                out["targets"].append(dict(target=f"{model}: {opt} mask updates once an epoch ({interval} steps at "
                                                  f"batch {step['batch']}) < {AMORTIZED_LIMIT:.0%} of training",
                                           value=f"{row['amortized']:.3%}", ok=row["amortized"] < AMORTIZED_LIMIT))
            out["updates"].append(row)
        loop, batched = u.get("fisher-loop"), u.get("fisher-batched")
        for name, r in (("fisher batched (ssam.empirical_fisher)", batched), ("fisher batch-1 loop", loop)):
            if r:
                out["updates"].append(dict(model=model, what=f"{name}, {r['num_samples']} samples",
                                           ms=1e3 * r["min"], ms_median=1e3 * r["median"], rounds=r["rounds"]))
        if loop and batched:
            speedup = ratio(loop, batched)
            gpu = batched["device"].startswith("cuda")
            need = GPU_FISHER_SPEEDUP if gpu else 1.0
            out["targets"].append(dict(target=f"{model}: batched Fisher " + (f">= {need:g}x" if gpu else "faster than")
                                       + f" the batch-1 loop ({batched['num_samples']} samples, {batched['device']})",
                                       value=f"{speedup:.2f}x" + spread(loop, batched), ok=speedup >= need if gpu else speedup > 1.0))
    return out


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def render(data, source):
    s, m = summarize(data), data.get("machine_info", {}).get("bench", {})
    device = {r["device"] for b in data["benchmarks"] for r in [b["extra_info"]]}
    lines = [f"# Throughput: SGD, SAM, SSAM-F, SSAM-D", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores ({m.get('threads', '?')} torch threads)"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; torch {m.get('torch', '?')}; device "
             + ", ".join(sorted(device)) + f"; load average {m.get('loadavg', '?')} at the start, "
             f"{m.get('loadavg_end', '?')} at the end (1, 5, 15 min).",
             f"Source: `{source}` ({data.get('datetime', '?')}). ms/step: fastest round over all passes (median in "
             "brackets). Ratios (x SGD, x SAM, targets): the median over passes of the ratio of the two methods' "
             "fastest rounds in the same pass; 'fastest rounds' divides the overall fastest rounds instead. OMP_WAIT_POLICY: " + str(m.get("omp_wait_policy", "?")) + ".", ""]
    lines += ["## One training step", "",
              "| model | batch | method | ms/step | x SGD | x SGD (fastest rounds) | paper FLOPs x SGD | x SAM | rounds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in s["steps"]:
        note = f" ({r['patched_linear']} Linear patched)" if "sparse_ascent" in r["method"] else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']}{note} | {r['ms']:.1f} ({r['ms_median']:.1f}) | "
                     f"{fmt(r['x_sgd'], '.2f')} | {fmt(r['x_sgd_min'], '.2f')} | {fmt(r['paper'], '.2f')} | "
                     f"{fmt(r['x_sam'], '.3f')} | {r['rounds']} |")
    lines += ["", "The paper's FLOPs column counts a sparse perturbation as proportionally cheaper (Tables 1-3, "
              "footnote 4); dense kernels do the same work whatever the mask, so on real hardware SSAM costs what SAM "
              "costs, except the 2:4 sparse-backward path on GPUs with sparse tensor cores.", ""]
    lines += ["## first_step alone (the only code where a non-update SSAM step differs from SAM's)", "",
              "| model | method | first_step ms | minus SAM's, ms | as a share of SAM's whole step | rounds |",
              "|---|---|---|---|---|---|"]
    for r in s["first_steps"]:
        lines.append(f"| {r['model']} | {r['method']} | {r['ms']:.2f} ({r['ms_median']:.2f}) | {fmt(r['delta_ms'], '+.2f')} | "
                     f"{fmt(r['of_sam_step'], '+.2%')} | {r['rounds']} |")
    lines += ["", "eps ⊙ m is one multiply over all weights; whole steps are 50-100x longer, so the difference "
              "between SSAM's and SAM's steps is measured here, where load from other jobs does not drown it.", ""]
    lines += ["## Mask updates", "", "| model | what | ms | interval (steps) | step ms | amortized share of training |",
              "|---|---|---|---|---|---|"]
    for r in s["updates"]:
        lines.append(f"| {r['model']} | {r['what']} | {r['ms']:.1f} ({r['ms_median']:.1f}) | {r.get('interval', '-')} | "
                     f"{fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('amortized'), '.3%')} |")
    lines += ["", "amortized = update time / interval / step time; interval = one CIFAR epoch "
              f"({common.CIFAR_TRAIN_IMAGES} images) at the benchmark's batch, the paper's once-an-epoch schedule "
              "(391 steps at batch 128).", ""]
    lines += ["## Optimizer memory (right after first_step)", "",
              "| model | method | total bytes | total MiB | x parameter bytes | masks MiB | momentum MiB | copy of w MiB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in s["steps"]:
        if "sparse_ascent" in r["method"] or not r["memory"]:
            continue
        mem, mb = r["memory"], 2 ** 20
        lines.append(f"| {r['model']} | {r['method']} | {mem['total']:,} | {mem['total'] / mb:.1f} | "
                     f"{mem['total'] / r['param_bytes']:.2f} | "
                     f"{mem['masks'] / mb:.1f} | {mem['momentum'] / mb:.1f} | {mem['weight_copy'] / mb:.1f} |")
    lines += ["", "Masks are torch.bool (1 byte an entry, 0.25x fp32 parameter bytes). Gradients are not counted.", ""]
    lines += ["## Targets", "", "Verdicts on the median over passes; the range of the per-pass ratios in brackets shows "
              "how far one pass can stray on this machine. A target closer to 1 than that range is wide is not "
              "resolved by this run: rerun with more --bench-passes / --bench-rounds.", "",
              "| target | measured | verdict |", "|---|---|---|"]
    for t in s["targets"]:
        lines.append(f"| {t['target']} | {t['value']} | {verdict(t['ok'])} |")
    passed = sum(t["ok"] for t in s["targets"])
    lines += ["", f"{passed} of {len(s['targets'])} targets met.", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", default=os.path.join(HERE, "results", "throughput.json"))
    ap.add_argument("-o", "--out", default=os.path.join(HERE, "results", "throughput.md"))
    args = ap.parse_args()
    with open(args.json) as f:
        data = json.load(f)
    text = render(data, os.path.relpath(args.json))
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"-> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
