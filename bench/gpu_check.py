"""The checks that need a CUDA GPU, in one script; on a machine without CUDA it prints "no CUDA device:
skipped" and exits 0.

    python bench/gpu_check.py                    # all checks + the throughput benchmark at GPU sizes
    python bench/gpu_check.py --no-bench         # correctness and kernel timings only (under a minute)
    python bench/gpu_check.py --cpu --no-bench   # run the same code on the CPU (the 2:4 kernel is CUDA-only)

1. ssam.sparse_input_grad, dX = dY (W ⊙ M), with torch.sparse semi-structured (2:4) against the dense product,
   in fp16 and bf16, on weights the kernel accepts (1024x1024 and 4096x1024, masks from ssam.nm_mask): error,
   time.
2. The first (ascent) pass of a bf16 TinyViT under ssam.sparse_ascent with the 2:4 kernel against the same
   pass with the kernel refused (dense fallback): the gradients must agree to bf16 precision.
3. Every method in common.METHODS on CUDA (ResNet-18 and TinyViT, fp32): 3 steps, finite weights, w restored
   bit for bit after first_step.
4. The throughput benchmark at GPU sizes (batch 128, TinyViT width 512) ->
   bench/results/throughput-gpu.{json,md}, including batched Fisher vs the batch-1 loop (target >= 10x) and
   the mask-update costs.
Exit status 1 if a correctness check (1-3) fails, or if on CUDA the 2:4 kernel never ran inside
ssam.sparse_input_grad (every shape fell back to the dense product: checks 1-2 would then compare dense with
dense). Performance targets, and a kernel that refuses some shapes only, are reported as PASS/MISS.
"""

import argparse
import contextlib
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import ssam
from bench import common

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Sizes: the GPU's, and tiny ones for --cpu (which only tests this script: fp16 matmuls crawl on a CPU).
SIZES = dict(
    cuda=dict(tokens=2048, warmup=3, repeat=20, width=512, batch=64),
    cpu=dict(tokens=64, warmup=1, repeat=2, width=64, batch=4),
)


def timed(fn, device, warmup=None, repeat=None):
    """Median seconds of fn() over `repeat` calls after `warmup` calls."""
    size = SIZES[torch.device(device).type]
    warmup = size["warmup"] if warmup is None else warmup
    repeat = size["repeat"] if repeat is None else repeat
    for _ in range(warmup):
        fn()
    common.sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        common.sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def semi_structured_refused():
    """Make torch.sparse.to_sparse_semi_structured raise: ssam.sparse_input_grad takes its dense fallback."""
    original = torch.sparse.to_sparse_semi_structured

    def refuse(*args, **kwargs):
        raise RuntimeError("refused by gpu_check")

    torch.sparse.to_sparse_semi_structured = refuse
    try:
        yield
    finally:
        torch.sparse.to_sparse_semi_structured = original


KERNEL_RUNS = [0]  # calls in which ssam.sparse_input_grad ran the 2:4 kernel, over the whole script


@contextlib.contextmanager
def count_kernel_runs():
    """Counts (into the yielded list, and KERNEL_RUNS) the products ssam.semi_structured_mm finished on the
    2:4 kernel: a compression or a matmul that raised (ssam then runs the dense product) is not counted."""
    original = ssam.semi_structured_mm
    runs = [0]

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)  # raises if the kernel refuses: not counted
        runs[0] += 1
        return out

    ssam.semi_structured_mm = counting
    try:
        yield runs
    finally:
        ssam.semi_structured_mm = original
        KERNEL_RUNS[0] += runs[0]


def expects_kernel(device):
    """On CUDA the 2:4 kernel must run at least once; on the CPU it cannot (torch's semi-structured is CUDA
    only)."""
    return torch.device(device).type == "cuda"


def kernel_verdict(device, runs):
    """The row that fails the script when the kernel was expected and never ran."""
    name = "2:4 kernel ran in ssam.sparse_input_grad"
    if not expects_kernel(device):
        return (name, f"not expected on {device} (CUDA only); every product ran dense", None)
    if runs == 0:
        return (
            name,
            "NEVER: every shape fell back to the dense product, so the 2:4 checks above compared "
            "dense with dense. Does this GPU/torch build support torch.sparse semi-structured (sm80+)?",
            False,
        )
    return (name, f"{runs} call(s) on the kernel", True)


# ----------------------------------------------------------------------------------------------------------
# 1. the 2:4 input gradient


def check_sparse_input_grad(device, rows):
    tokens = SIZES[device]["tokens"]
    for dtype in (torch.float16, torch.bfloat16):
        for out_f, in_f in ((1024, 1024), (4096, 1024)):
            torch.manual_seed(0)
            w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f**0.5
            mask = ssam.nm_mask(w.float().abs(), 2, 4)
            gy = torch.randn(tokens, out_f, device=device, dtype=dtype)
            ref = gy.double() @ (w * mask).double()  # exact reference
            try:  # does the kernel take it?
                wt = torch.sparse.to_sparse_semi_structured((w * mask).t().contiguous())
                wt @ gy.t().contiguous()
                kernel, why = True, ""
            except (RuntimeError, ValueError, NotImplementedError) as e:
                wt, kernel, why = None, False, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            with count_kernel_runs() as runs:
                out = ssam.sparse_input_grad(gy, w, mask)
            dense = gy @ (w * mask)
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            err_dense = ((dense.double() - ref).abs().max() / ref.abs().max()).item()
            ok = out.shape == dense.shape and err <= max(4 * err_dense, 1e-2)
            if ok and not runs[0] and expects_kernel(device):
                ok = "MISS"  # right, but not on the kernel
            t_call = timed(lambda: ssam.sparse_input_grad(gy, w, mask), device)  # compress + sparse matmul
            t_dense = timed(lambda: gy @ (w * mask), device)  # the fallback
            t_kernel = timed(lambda: wt @ gy.t().contiguous(), device) if kernel else None
            name = f"sparse_input_grad {str(dtype)[6:]} W {out_f}x{in_f}, dY {tokens}x{out_f}"
            detail = (
                f"2:4 kernel {'used' if kernel else 'REFUSED (' + why + ')'}"
                f"{'' if runs[0] else ', ssam.sparse_input_grad ran dense'}; rel err {err:.1e} (dense "
                f"{err_dense:.1e}); ms: call {1e3 * t_call:.3f}, dense {1e3 * t_dense:.3f}"
                + (f", matmul alone {1e3 * t_kernel:.3f} ({t_dense / t_kernel:.2f}x dense)" if kernel else "")
            )
            rows.append((name, detail, ok))


# ----------------------------------------------------------------------------------------------------------
# 2. sparse_ascent in bf16: the kernel's ascent gradient against the dense fallback's


def check_sparse_ascent_bf16(device, rows):
    torch.manual_seed(0)
    batch, width = SIZES[device]["batch"], SIZES[device]["width"]
    model = common.TinyViT(width=width).to(device, torch.bfloat16)
    x = torch.randn(batch, 3, 32, 32, device=device, dtype=torch.bfloat16)
    y = torch.randint(0, 10, (batch,), device=device)
    opt, _ = common.make_optimizer(model, "--optimizer ssamd --sparsity 0.5 --structure 2:4")

    def ascent_grads():
        with ssam.sparse_ascent(model, opt):
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        return torch.cat([g.float().reshape(-1) for g in grads])

    with count_kernel_runs() as runs:
        g_kernel = ascent_grads()
        t_kernel = timed(ascent_grads, device)
    with semi_structured_refused():
        g_dense = ascent_grads()
        t_dense = timed(ascent_grads, device)
    err = ((g_kernel - g_dense).norm() / g_dense.norm()).item()
    ok = bool(torch.isfinite(g_kernel).all()) and err < 5e-2
    detail = (
        f"rel err vs dense fallback {err:.1e}; ms: 2:4 {1e3 * t_kernel:.1f}, dense {1e3 * t_dense:.1f} "
        f"({t_dense / t_kernel:.2f}x); kernel calls {runs[0]}"
    )
    if expects_kernel(device) and not runs[0]:  # both passes ran dense: the comparison proves nothing
        ok, detail = False, f"the 2:4 kernel never ran in the ascent pass (dense vs dense): {detail}"
    rows.append((f"sparse_ascent bf16 TinyViT-{width} b{batch}, ascent pass", detail, ok))


# ----------------------------------------------------------------------------------------------------------
# 3. every method steps on CUDA and restores w exactly


def check_steps(device, rows):
    batch = SIZES[device]["batch"] // 2
    for model_name in ("resnet18", "vit"):
        for method, (flags, _) in common.METHODS.items():
            if "--sparse-ascent" in flags and model_name == "resnet18":
                continue  # no nn.Linear a 2:4 mask fits
            torch.manual_seed(0)
            model = common.make_model(model_name).to(device)
            x = torch.randn(batch, 3, 32, 32, device=device)
            y = torch.randint(0, 10, (batch,), device=device)
            opt, cfg = common.make_optimizer(model, flags, num_samples=batch)
            if cfg.optimizer == "ssamf":
                opt.update_mask(model, [(x, y)])
            for _ in range(3):
                common.train_step(model, opt, cfg, x, y)
            ok = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            if isinstance(opt, ssam.SAM):
                w = [p.detach().clone() for p in model.parameters()]
                F.cross_entropy(model(x), y).backward()
                opt.first_step(zero_grad=True)
                moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), w))
                opt.restore()
                ok = ok and moved and all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
            rows.append(
                (
                    f"{model_name} {method}: 3 steps on {device}",
                    "finite weights" + (", w restored bit for bit" if isinstance(opt, ssam.SAM) else ""),
                    ok,
                )
            )


# ----------------------------------------------------------------------------------------------------------
# 4. the throughput benchmark at GPU sizes


def run_benchmark(device, rows, extra):
    out = os.path.join(HERE, "results", "throughput-gpu")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        os.path.join(HERE),
        "--benchmark-only",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--bench-device={device}",
        "--bench-batch=128",
        "--bench-width=512",
        "--bench-rounds=20",
        "--bench-first-step-calls=50",
        f"--benchmark-json={out}.json",
    ] + extra
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        rows.append(("throughput benchmark", f"pytest exited {proc.returncode}", False))
        return
    subprocess.run(
        [sys.executable, os.path.join(HERE, "report.py"), f"{out}.json", "-o", f"{out}.md"],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    import json

    import report

    with open(f"{out}.json") as f:
        summary = report.summarize(json.load(f))
    for r in summary["steps"]:
        rows.append(
            (
                f"step {r['model']} b{r['batch']} {r['method']}",
                f"{r['ms']:.2f} ms, {r['x_sgd'][0]:.2f}x SGD "
                f"(FLOP bound {r['flops']:.2f}x), {r['x_sam']:.3f}x SAM",
                None,
            )
        )
    for t in summary["targets"]:
        rows.append((t["target"], t["value"], t["verdict"]))
    rows.append(("report", f"{out}.md", None))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-bench", action="store_true", help="skip the throughput benchmark (check 4)")
    ap.add_argument(
        "--cpu", action="store_true", help="run checks 1-3 on the CPU (tests this script, not the GPU)"
    )
    ap.add_argument("bench_args", nargs="*", help="after --: more pytest flags for the benchmark")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu:
        print("no CUDA device: skipped")
        return 0
    device = "cpu" if args.cpu else "cuda"
    m = common.machine()
    print(f"{m.get('gpu', m['cpu'])}; torch {m['torch']}; CUDA {torch.version.cuda}", flush=True)
    rows, t0 = [], time.perf_counter()
    KERNEL_RUNS[0] = 0
    for check in (check_sparse_input_grad, check_sparse_ascent_bf16, check_steps, None):
        n = len(rows)
        try:
            if check is None:  # after checks 1-3: did the 2:4 kernel run at all?
                rows.append(kernel_verdict(device, KERNEL_RUNS[0]))
            else:
                check(device, rows)
        except Exception as e:  # report and go on: one broken check must not hide others
            rows.append((check.__name__, f"raised {type(e).__name__}: {str(e).splitlines()[0][:120]}", False))
        for name, detail, ok in rows[n:]:
            mark = {False: "FAIL", None: "--  ", "MISS": "MISS"}.get(ok, "ok  ")
            print(f"  {mark} {name}: {detail}", flush=True)
    if not args.no_bench:
        run_benchmark(device, rows, args.bench_args)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check'.ljust(width)}  result  detail")
    for name, detail, ok in rows:
        mark = {True: "ok", False: "FAIL", None: ""}.get(ok, ok)
        print(f"{name.ljust(width)}  {mark:6}  {detail}")
    failed = [r for r in rows if r[2] is False]
    print(f"\n{len(failed)} correctness failure(s); {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
