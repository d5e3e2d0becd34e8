"""Short real trainings of SGD, SAM, SSAM-F and SSAM-D at several sparsities, 3 seeds each, through train.py:
test accuracy mean ± std per method and its difference to SAM (the shape of the paper's Tables 1-2 and Fig. 3,
at a size that fits a laptop). Writes bench/results/accuracy.json and accuracy.md; runs go to runs/bench-accuracy/.

    python bench/accuracy.py                      # defaults: < 30 min on 2 CPU cores (quiet machine)
    python bench/accuracy.py --quick              # 1 seed, SSAM at 0.5 and 0.9 only, 3 epochs: a smoke run
    python bench/accuracy.py --model wrn16-1 --epochs 10 --seeds 0 1 2 --jobs 1      # bigger, on a GPU box
    python bench/plots.py bench/results/accuracy.json                                # Fig. 2 and Fig. 3

Each run is `python train.py --dataset cifar10-subset --model M --optimizer O --sparsity S --epochs E --seed K
--out-dir DIR --fresh` (5,000 training and 1,000 test images of CIFAR-10 shipped in data/). With --jobs 2 two
runs share the machine, each with one thread: small models train faster that way than one run on two threads.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

# Why these defaults: wrn10-1 (78k weights) is the smallest WideResNet train.py builds; one epoch of the 5,000-image
# subset at batch 128 takes ~16 s with SGD and ~31 s with SAM-type optimizers on one core (measured, two runs side by
# side on the 2-core box), so 8 configurations x 3 seeds x 4 epochs fit in ~25 minutes. 4 epochs reach ~40-45%
# test accuracy: far from converged, enough to see whether a method trains at all and how much seeds scatter.
DEFAULTS = dict(model="wrn10-1", epochs=4, seeds=[0, 1, 2], sparsities=[0.5, 0.9, 0.99])


def configs(sparsities):
    """'<opt>-tensor' runs SSAM with whole-tensor masks (--structure tensor); samon: normalization layers only."""
    return ([("sgd", None), ("sam", None), ("samon", None)] + [(o, s) for o in ("ssamf", "ssamd") for s in sparsities]
            + [("ssamd-tensor", s) for s in sparsities])


def run_name(opt, sparsity, seed):
    return f"{opt}" + ("" if sparsity is None else f"-s{sparsity:g}") + f"-seed{seed}"


def command(args, opt, sparsity, seed, out_dir):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "cifar10-subset", "--model", args.model,
           "--optimizer", opt.removesuffix("-tensor"), "--epochs", str(args.epochs), "--seed", str(seed), "--out-dir", out_dir, "--fresh"]
    if sparsity is not None:
        cmd += ["--sparsity", str(sparsity)]
    if opt.endswith("-tensor"):
        cmd += ["--structure", "tensor"]
    return cmd + args.train_args


def read_run(out_dir):
    """final.json and metrics.jsonl of one train.py run."""
    with open(os.path.join(out_dir, "final.json")) as f:
        final = json.load(f)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    return final, metrics


def run_all(args, jobs):
    """Run every (optimizer, sparsity, seed) through train.py, `args.jobs` at a time. Returns the run records."""
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.jobs)))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")       # no spinning threads on a shared box (see bench/conftest.py)
    pending, running, records = list(jobs), [], []
    t_start = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.jobs:
            opt, sparsity, seed = pending.pop(0)
            out_dir = os.path.join(args.runs_dir, run_name(opt, sparsity, seed))
            if args.reuse and os.path.exists(os.path.join(out_dir, "final.json")):
                records.append(dict(optimizer=opt, sparsity=sparsity, seed=seed, out_dir=out_dir, wall_s=None))
                continue
            os.makedirs(out_dir, exist_ok=True)
            log = open(os.path.join(out_dir, "train.log"), "w")
            proc = subprocess.Popen(command(args, opt, sparsity, seed, out_dir), cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            running.append((proc, log, time.perf_counter(), dict(optimizer=opt, sparsity=sparsity, seed=seed,
                                                                 out_dir=out_dir)))
        time.sleep(0.5)
        for item in list(running):
            proc, log, t0, rec = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode != 0:
                for p, lg, _, _ in running:
                    p.kill()
                    lg.close()
                tail = open(os.path.join(rec["out_dir"], "train.log")).read()[-3000:]
                raise SystemExit(f"train.py failed ({proc.returncode}) for {rec}:\n{tail}")
            rec["wall_s"] = time.perf_counter() - t0
            records.append(rec)
            done = len(records)
            print(f"[{done}/{len(jobs)}] {run_name(rec['optimizer'], rec['sparsity'], rec['seed'])}: "
                  f"{rec['wall_s']:.0f} s (elapsed {time.perf_counter() - t_start:.0f} s)", flush=True)
    for rec in records:
        rec["final"], rec["metrics"] = read_run(rec["out_dir"])
        rec["test_acc"] = rec["final"]["test_acc"]
    return records


def summarize(records):
    """Mean ± std (sample std over seeds) of the final test accuracy per (optimizer, sparsity); diff to SAM."""
    groups = {}
    for r in records:
        groups.setdefault((r["optimizer"], r["sparsity"]), []).append(r["test_acc"])
    rows = [dict(optimizer=o, sparsity=s, n=len(a), mean=statistics.mean(a),
                 std=statistics.stdev(a) if len(a) > 1 else 0.0, accs=a) for (o, s), a in groups.items()]
    sam = next((r["mean"] for r in rows if r["optimizer"] == "sam"), None)
    for r in rows:
        r["diff_to_sam"] = None if sam is None else r["mean"] - sam
    return rows


def render(result):
    s, m = result["settings"], result["machine"]
    lines = ["# Accuracy: SGD, SAM, SSAM-F, SSAM-D (short runs)", "",
             f"{s['model']} on cifar10-subset (5,000 train / 1,000 test images), {s['epochs']} epochs, seeds "
             f"{s['seeds']}, train.py defaults otherwise (the cifar10-subset preset: batch 64, lr 0.05 cosine, rho 0.1, masks updated once an "
             f"epoch). {len(result['runs'])} runs, {s['jobs']} at a time; total wall time {result['wall_s'] / 60:.1f} "
             "min.",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average at the start "
             f"{m.get('loadavg', '?')}.", "",
             "| optimizer | sparsity | test acc (mean ± std) | diff to SAM | seeds | per seed |", "|---|---|---|---|---|---|"]
    for r in result["summary"]:
        diff = "-" if r["diff_to_sam"] is None else f"{100 * r['diff_to_sam']:+.2f}"
        lines.append(f"| {r['optimizer']} | {'-' if r['sparsity'] is None else format(r['sparsity'], 'g')} | "
                     f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} | {diff} | {r['n']} | "
                     f"{', '.join(f'{100 * a:.1f}' for a in r['accs'])} |")
    lines += ["", "Percentages; std is the sample standard deviation over seeds. With 1,000 test images one image is "
              "0.1 point, and runs this short are far from convergence: read differences smaller than about two "
              "standard deviations as no difference.", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULTS["model"], help="train.py --model (default %(default)s)")
    ap.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="default %(default)s")
    ap.add_argument("--seeds", type=int, nargs="+", default=DEFAULTS["seeds"], help="default 0 1 2")
    ap.add_argument("--sparsities", type=float, nargs="+", default=DEFAULTS["sparsities"], help="default 0.5 0.9 0.99")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, sharing the cores evenly (default 2)")
    ap.add_argument("--quick", action="store_true", help="1 seed, sparsities 0.5 0.9, 3 epochs: ~5 minutes")
    ap.add_argument("--reuse", action="store_true", help="keep runs whose final.json exists instead of retraining")
    ap.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "bench-accuracy"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "accuracy"), help="writes OUT.json and OUT.md")
    ap.add_argument("train_args", nargs="*", help="after --: more train.py flags, e.g. -- --train-size 2000")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.sparsities, args.epochs = args.seeds[:1], [0.5, 0.9], 3
    import common
    machine = common.machine()
    jobs = [(o, s, k) for o, s in configs(args.sparsities) for k in args.seeds]
    print(f"{len(jobs)} runs of train.py ({args.model}, {args.epochs} epochs), {args.jobs} at a time", flush=True)
    t0 = time.perf_counter()
    records = run_all(args, jobs)
    wall = time.perf_counter() - t0
    result = dict(settings=dict(model=args.model, epochs=args.epochs, seeds=args.seeds, sparsities=args.sparsities,
                                jobs=args.jobs, train_args=args.train_args), machine=machine, wall_s=wall,
                  summary=summarize(records), runs=records)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    text = render(result)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"-> {args.out}.json, {args.out}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
