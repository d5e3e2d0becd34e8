"""Throughput of one training step per optimizer, and the cost of mask updates (pytest-benchmark).

    OMP_WAIT_POLICY=PASSIVE pytest bench/ --benchmark-only --benchmark-json bench/results/throughput.json
    python bench/report.py                        # -> bench/results/throughput.md

Group "step: <model> b<batch>": one full step (SGD: 1 forward/backward; SAM-type: 2) of every method in
common.METHODS, on synthetic data already on the device. SSAM steps are non-update steps: SSAM-F's mask is made
once before timing, SSAM-D's update_interval is 10^9. Group "first_step: <model>": first_step alone (SAM and the SSAM variants), the only place a non-update SSAM step
differs from a SAM step. Group "mask update: <model>": SSAM-F's Fisher over N_F
samples (ssam.empirical_fisher against the batch-1 loop common.fisher_loop), SSAM-F's whole update_mask, and
SSAM-D's update_mask.

Every benchmark runs once per pass (--bench-passes, the outermost loop), so the methods alternate in time and a
burst of load from another job hits them alike; report.py merges the passes (fastest round). Models and
optimizers live across passes (built and warmed up on the first). The first pass also stores, in extra_info,
the bytes the optimizer holds right after first_step (masks, momentum, the copy of w).
"""
import pytest
import torch
import torch.nn.functional as F

import common
import ssam

LIVE = {}   # (model, method, device, batch, width) -> (model, opt, x, y), kept across passes


def data(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g).to(cfg["device"])
    y = torch.randint(0, 10, (n,), generator=g).to(cfg["device"])
    return x, y


def fresh_model(model_name, cfg):
    torch.manual_seed(0)
    return common.make_model(model_name, cfg["width"]).to(cfg["device"])


def info(benchmark, net, cfg, bench_pass, **kw):
    benchmark.extra_info.update(device=cfg["device"], batch=cfg["batch"], width=cfg["width"], bench_pass=bench_pass,
                                params=sum(p.numel() for p in net.parameters()),
                                param_bytes=common.param_bytes(net), **kw)


# ----------------------------------------------------------------------------------------------------------
# One training step

@pytest.mark.parametrize("method", common.METHODS, ids=[common.method_name(*m) for m in common.METHODS])
def test_step(benchmark, bench_pass, model_name, method, cfg):
    opt_name, sparsity, structure, sparse_ascent = method
    if sparse_ascent and model_name == "resnet18":
        pytest.skip("ResNet-18 has no nn.Linear a 2:4 mask fits (its fc has 10 outputs): nothing to patch")
    benchmark.group = f"step: {model_name} b{cfg['batch']}"
    key = (model_name, method, cfg["device"], cfg["batch"], cfg["width"])
    first = key not in LIVE
    if first:
        model = fresh_model(model_name, cfg)
        x, y = data(cfg, cfg["batch"])
        opt = common.make_optimizer(model, opt_name, sparsity, structure, num_samples=cfg["batch"])
        if opt_name == "ssamf":                         # the mask, once: the timed steps are non-update steps
            opt.update_mask(model, [(x, y)])
        LIVE[key] = model, opt, x, y
    model, opt, x, y = LIVE[key]
    benchmark.pedantic(common.train_step, args=(model, opt, x, y, sparse_ascent), rounds=cfg["rounds"],
                       warmup_rounds=1 if first else 0, iterations=1)
    if opt_name in ("ssamf", "ssamd"):
        assert opt.last_mask_update == 0, "a timed step updated the mask"
    extra = {}
    if first:
        if isinstance(opt, ssam.SAM):                   # what is held between first_step and second_step
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            extra["memory"] = common.optimizer_state_bytes(opt)
            opt.restore()
            opt.zero_grad(set_to_none=True)
        else:
            extra["memory"] = common.optimizer_state_bytes(opt)
        if sparse_ascent:
            with ssam.sparse_ascent(model, opt) as patched:
                extra["patched_linear"] = len(patched)
    info(benchmark, model, cfg, bench_pass, kind="step", model=model_name, method=common.method_name(*method),
         opt=opt_name, sparsity=sparsity, structure=structure, sparse_ascent=sparse_ascent, **extra)


# ----------------------------------------------------------------------------------------------------------
# first_step alone: the only code a non-update SSAM step runs that a SAM step does not (eps ⊙ m), so timing it
# measures SSAM's overhead over SAM far more precisely than whole steps can on a busy machine

FIRST_STEP_METHODS = [m for m in common.METHODS if m[0] != "sgd" and not m[3]]


@pytest.mark.parametrize("method", FIRST_STEP_METHODS, ids=[common.method_name(*m) for m in FIRST_STEP_METHODS])
def test_first_step(benchmark, bench_pass, model_name, method, cfg):
    opt_name, sparsity, structure, _ = method
    benchmark.group = f"first_step: {model_name}"
    key = ("first_step", model_name, method, cfg["device"], cfg["batch"], cfg["width"])
    first = key not in LIVE
    if first:
        model = fresh_model(model_name, cfg)
        x, y = data(cfg, cfg["batch"])
        opt = common.make_optimizer(model, opt_name, sparsity, structure, num_samples=cfg["batch"])
        if opt_name == "ssamf":
            opt.update_mask(model, [(x, y)])
        params = list(model.parameters())
        grads = list(torch.autograd.grad(F.cross_entropy(model(x), y), params))
        LIVE[key] = model, opt, params, grads
    model, opt, params, grads = LIVE[key]

    def setup():                                        # untimed: back to w, a fresh gradient in p.grad
        opt.restore()
        for p, g in zip(params, grads):
            p.grad = g.clone()
        common.sync(cfg["device"])

    benchmark.pedantic(run_sync, args=(opt.first_step, cfg["device"]), setup=setup, rounds=cfg["first_step_rounds"],
                       warmup_rounds=2 if first else 0, iterations=1)
    opt.restore()
    opt.zero_grad(set_to_none=True)
    info(benchmark, model, cfg, bench_pass, kind="first_step", model=model_name, method=common.method_name(*method),
         opt=opt_name, sparsity=sparsity, structure=structure)


# ----------------------------------------------------------------------------------------------------------
# Mask updates: SSAM-F's Fisher batched vs one sample at a time, and the two update_mask calls

def run_sync(fn, device, *args):
    out = fn(*args)
    common.sync(device)
    return out


@pytest.mark.parametrize("impl", ["batched", "loop"])
def test_fisher(benchmark, bench_pass, model_name, impl, cfg):
    benchmark.group = f"mask update: {model_name}"
    n = cfg["fisher_samples"]
    model, (x, y) = fresh_model(model_name, cfg), data(cfg, n)
    fisher = common.fisher_loop if impl == "loop" else ssam.empirical_fisher
    benchmark.pedantic(run_sync, args=(fisher, cfg["device"], model, [(x, y)], n), rounds=1, iterations=1)
    info(benchmark, model, cfg, bench_pass, kind="fisher", model=model_name, impl=impl, num_samples=n)


def test_ssamf_update_mask(benchmark, bench_pass, model_name, cfg):
    benchmark.group = f"mask update: {model_name}"
    n = cfg["fisher_samples"]
    model, (x, y) = fresh_model(model_name, cfg), data(cfg, n)
    opt = common.make_optimizer(model, "ssamf", 0.5, num_samples=n)
    benchmark.pedantic(run_sync, args=(opt.update_mask, cfg["device"], model, [(x, y)]), rounds=1, iterations=1)
    info(benchmark, model, cfg, bench_pass, kind="mask-update", model=model_name, opt="ssamf", sparsity=0.5,
         num_samples=n)


def test_ssamd_update_mask(benchmark, bench_pass, model_name, cfg):
    benchmark.group = f"mask update: {model_name}"
    model, (x, y) = fresh_model(model_name, cfg), data(cfg, cfg["batch"])
    opt = common.make_optimizer(model, "ssamd", 0.5)
    grads = common.ssamd_grads(model, x, y)             # at step 0 the drop count is largest (Eq. 9)
    benchmark.pedantic(run_sync, args=(opt.update_mask, cfg["device"], grads), rounds=cfg["rounds"],
                       warmup_rounds=1, iterations=1)
    info(benchmark, model, cfg, bench_pass, kind="mask-update", model=model_name, opt="ssamd", sparsity=0.5)
