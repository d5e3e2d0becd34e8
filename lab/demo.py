"""train.py --demo (make demo): SGD, SAM, SSAM-F, SSAM-D and cost-aware whole-tensor SSAM-F at sparsity 0.9 on
the preset, then one table: test accuracy, step time, its ratio to SGD's, mask density, Hessian lambda_1.

The runs go through lab/grid.py (runs/demo/<name>; a finished run of the same config is reused). The
"x SGD" column is measured after the runs, side by side: ROUNDS rounds of STEPS steps of every method in turn,
each round's ratio to SGD's steps of the same round, and the median over rounds (as bench/report.py does
for throughput), so that load from other processes hits every method alike."""

import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lab import sharpness
from lab.config import READ_BY, ROOT, get_args
from lab.grid import run_grid
from lab.methods import method_of

METHODS = ["sgd", "sam", "ssamf", "ssamd"]  # + cost-aware whole-tensor SSAM-F at sparsity 0.9 (FAST)
FAST = ["--sparsity", "0.9", "--structure", "tensor", "--mask-select", "cost"]
EPOCHS = 2  # unless --epochs: the five rows in under 3 minutes on a 2-core CPU
HVPS = 10  # lambda_1 agreed with 20 and 40 steps to 3 digits on a wrn10-1 checkpoint (bench/sharpness.py)
ROUNDS, STEPS = 5, 2  # the interleaved timing of "x SGD"


def main(argv, train):
    """argv: train.py's flags with --demo; train: the train module (train.train, set_up, one_step). Trains
    what is not done, for EPOCHS epochs unless --epochs, with the other flags given; runs in runs/demo/ (or
    --out-dir); --fresh trains again. Prints accuracy, cost and the Hessian's lambda_1."""
    args, t0 = get_args(argv, demo="-"), time.perf_counter()
    for k in ("optimizer", "name", "resume"):  # a flag the demo would ignore is an error, as in train()
        if getattr(args, k) not in (None, False):
            raise SystemExit(
                f"--demo trains sgd, sam, ssamf and ssamd in runs of its own, and reuses finished ones: "
                f"drop --{k}"
            )
    runs = run_grid(
        plans(argv, args), args.out_dir or ROOT / "runs" / "demo", fresh=args.fresh, train_fn=train.train
    )
    rows = []
    for c, final in runs:
        t1 = time.perf_counter()
        model, _ = sharpness.load_run(Path(c.out_dir) / "ckpt.pt", "cpu")
        x, y = sharpness.train_batch(c, min(128, c.train_size or 128), "cpu")
        lam = sharpness.top_eigenvalues(model, x, y, k=1, iters=HVPS)[0]
        rows.append((c, final, lam, time.perf_counter() - t1))
    ratios, n_test = x_sgd([c for c, _ in runs], train)
    Console().print(table(rows, ratios, n_test, t0))
    Console().print(
        f"x SGD: the median over {ROUNDS} rounds of the step-time ratio to SGD, every method timed in each "
        f"round ({STEPS} steps each, after the runs). lambda_1: top eigenvalue of the training-loss Hessian "
        f"on 128 training images ({HVPS} Lanczos steps, {sum(r[3] for r in rows):.0f} s for all "
        f"{len(rows)}): "
        "lower = flatter minimum, what SAM is for. One seed after a few epochs; the converged comparison "
        "(seeds, confidence intervals) is `make bench-accuracy` -> bench/results/accuracy.md. "
        "ssamf-tensor-cost: whole-tensor masks, the most score per unit of ascent-pass cost (--structure "
        "tensor --mask-select cost), the cheap SSAM-F."
    )


def plans(argv, args):
    """The demo's runs as train.py flag lists: each optimizer with the flags given that it reads."""
    epochs = args.epochs or EPOCHS
    keep = passed_on(argv) + ([] if args.epochs else ["--epochs", str(epochs)])
    if args.eval_every is None:  # 10,000 test images: measure once, at the end
        keep += ["--eval-every", str(epochs)]
    grid = [flags_for(keep, o) for o in METHODS]
    return grid + [
        flags_for(keep, "ssamf", drop=("sparsity", "structure", "mask_select", "sparse_ascent")) + FAST
    ]


def passed_on(argv):
    """The demo's flags less the ones its runner sets (--out-dir, --name, --optimizer, --demo, --fresh...)."""
    keep, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
        elif a in ("--out-dir", "--name", "--optimizer"):
            skip = 1
        elif a not in ("--demo", "--fresh", "--resume") and not a.startswith(
            ("--out-dir=", "--name=", "--optimizer=")
        ):
            keep.append(a)
    return keep


def flags_for(keep, o, drop=()):
    """The flags of `keep` that optimizer o reads (none of `drop`), and --optimizer o."""
    out, i = [], 0
    while i < len(keep):
        k = keep[i].removeprefix("--").split("=")[0].replace("-", "_")
        n = 1 + (i + 1 < len(keep) and "=" not in keep[i] and not keep[i + 1].startswith("--"))
        out += keep[i : i + n] if (k not in READ_BY or o in READ_BY[k]) and k not in drop else []
        i += n
    return out + ["--optimizer", o]


def x_sgd(configs, train):
    """Each run's step time over SGD's (the first run), measured side by side: in each of ROUNDS rounds,
    STEPS steps of every run's method in turn (from its initial weights, after one untimed step); the
    median over rounds of the round's ratio. -> (ratios, test images)."""
    runs = []
    for c in configs:
        device, _, _ = train.setup_distributed(c)
        torch.manual_seed(c.seed)
        run = train.set_up(c, device, 0, 1)
        runs.append((run, endless(run)))

    def steps(run, data, n):
        tot = train.step_totals(run.device)
        t0 = time.perf_counter()
        for _ in range(n):
            train.one_step(run, *next(data), tot)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for run, batches in runs:  # SSAM-F's first mask, warm caches
        steps(run, batches, 1)
    times = [[steps(run, batches, STEPS) for run, batches in runs] for _ in range(ROUNDS)]
    ratios = [statistics.median(t[i] / t[0] for t in times) for i in range(len(runs))]
    test = getattr(runs[0][0].data, "test_y", None)
    return ratios, "?" if test is None else len(test)


def endless(run):
    """The run's training batches, epoch after epoch."""
    while True:
        yield from run.data.batches(run.g)


def table(rows, ratios, n_test, t0):
    c0, final0 = rows[0][0], rows[0][1]
    title = f"{c0.preset}: {c0.model}, {c0.epochs} epochs, {n_test} test images, "
    title += f"{final0['device']}, total {time.perf_counter() - t0:.0f} s"
    out = Table(title=title)
    out.add_column("optimizer", no_wrap=True)  # a method of lab/methods.py
    for column in ("sparsity", "test acc", "ms/step", "x SGD", "mask density", "Hessian lambda_1"):
        out.add_column(column)
    for (c, final, lam, _), ratio in zip(rows, ratios):
        method, sparsity = method_of(c)
        out.add_row(
            method,
            "-" if sparsity is None else f"{sparsity}",
            f"{100 * final['test_acc']:.1f}%",
            f"{final['step_ms']:.0f}",
            f"{ratio:.2f}",
            f"{final['density']:.3f}",
            f"{lam:.0f}",
        )
    return out
