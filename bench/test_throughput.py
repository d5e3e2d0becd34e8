"""Throughput of one training step per method, and the cost of mask updates (pytest-benchmark).

    OMP_WAIT_POLICY=PASSIVE pytest bench/ --benchmark-only --benchmark-json bench/results/throughput.json
    python bench/report.py                        # -> bench/results/throughput.md

Rounds, interleaved: pytest runs round 0 of every benchmark of a group, then round 1, and so on
(--bench-rounds, the outermost loop), so the methods alternate in time and a burst of load from another job
hits one round of all of them alike. report.py takes each ratio between two methods per round and reports the
median over rounds with a bootstrap 95% interval.

Group "step: <model> b<batch>": one full training step (train.train_step, fp32) of every method in
common.METHODS, on subset images already on the device; one timed step per round, after one untimed warm-up
step in round 0 (--ascent-every k: one whole period of k steps, its time divided by k in report.py). SSAM
steps are non-update steps: SSAM-F's mask is made once before timing, no timed step
updates a mask. Round 0 also stores, in extra_info, the method's FLOP bound (common.flops_x_sgd) and the bytes
the optimizer holds right after first_step (masks, momentum, the copy of w).
Group "first_step: <model>": first_step alone (SAM and the element-wise/N:M SSAM variants), the only place a
non-update SSAM step differs from a SAM step; --bench-first-step-calls timed calls a round, the fastest kept.
Group "mask update: <model>": SSAM-F's Fisher over N_F samples (ssam.empirical_fisher), SSAM-F's whole
update_mask and SSAM-D's, once in each of --bench-update-rounds rounds.
"""

import pytest
import torch
import torch.nn.functional as F

import ssam
from bench import common
from lab.methods import SPARSE

LIVE = {}  # (what, model, method, device, batch, width) -> objects kept across rounds
TRAINED = {}


def fresh_model(model_name, cfg):
    torch.manual_seed(0)
    return common.make_model(model_name, cfg["width"]).to(cfg["device"])


def model_for(model_name, weights, cfg):
    """A new model with the seed-0 init or the trained state (made once per model, then copied)."""
    model = fresh_model(model_name, cfg)
    if weights == "trained":
        if model_name not in TRAINED:
            TRAINED[model_name] = common.trained_model(
                model_name, cfg["width"], cfg["device"], cfg["train_steps"], cfg["batch"]
            ).state_dict()
        model.load_state_dict(TRAINED[model_name])
    return model


def info(benchmark, net, cfg, bench_round, **kw):
    benchmark.extra_info.update(
        device=cfg["device"],
        batch=cfg["batch"],
        width=cfg["width"],
        bench_round=bench_round,
        params=sum(p.numel() for p in net.parameters()),
        param_bytes=common.param_bytes(net),
        **kw,
    )


def run_sync(fn, device, *args):
    out = fn(*args)
    common.sync(device)
    return out


# ----------------------------------------------------------------------------------------------------------
# One training step


@pytest.mark.parametrize("method", list(common.METHODS))
def test_step(benchmark, bench_round, model_name, method, cfg):
    flags, weights = common.METHODS[method]
    if "--sparse-ascent" in flags and model_name == "resnet18":
        pytest.skip("ResNet-18 has no nn.Linear a 2:4 mask fits (its fc has 10 outputs): nothing to patch")
    benchmark.group = f"step: {model_name} b{cfg['batch']}"
    key = ("step", model_name, method, cfg["device"], cfg["batch"], cfg["width"])
    first = key not in LIVE
    extra = {}
    if first:
        model = model_for(model_name, weights, cfg)
        x, y = common.batch(cfg["batch"], cfg["device"])
        opt, tcfg = common.make_optimizer(model, flags, num_samples=cfg["batch"])
        if tcfg.optimizer == "ssamf":  # the mask, once: the timed steps are non-update steps
            opt.update_mask(model, [common.batch(cfg["batch"], cfg["device"], start=cfg["batch"])])
        extra["flops_x_sgd"] = common.flops_x_sgd(model, opt, tcfg, x)
        if hasattr(opt, "density"):
            extra["density"] = opt.density()
        LIVE[key] = model, opt, tcfg, x, y
    model, opt, tcfg, x, y = LIVE[key]
    benchmark.pedantic(
        common.train_step,
        args=(model, opt, tcfg, x, y),
        rounds=1,
        warmup_rounds=1 if first else 0,
        iterations=1,
    )
    if tcfg.optimizer in SPARSE:
        assert opt.last_mask_update == 0, "a timed step updated the mask"
    if first:  # after steps: the momentum buffers exist
        if isinstance(opt, ssam.SAM):  # what is held between first_step and second_step
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            extra["memory"] = common.optimizer_state_bytes(opt)
            opt.restore()
            opt.zero_grad(set_to_none=True)
        else:
            extra["memory"] = common.optimizer_state_bytes(opt)
    info(
        benchmark,
        model,
        cfg,
        bench_round,
        kind="step",
        model=model_name,
        method=method,
        flags=flags,
        weights=weights,
        opt=tcfg.optimizer,
        sparsity=tcfg.sparsity if tcfg.optimizer in SPARSE else 0.0,
        ascent_fraction=tcfg.ascent_fraction,
        period=tcfg.ascent_every,  # the timed call ran this many steps: report.py divides by it
        **extra,
    )


# ----------------------------------------------------------------------------------------------------------
# first_step alone: the only code a non-update element-wise SSAM step runs that a SAM step does not (eps ⊙ m),
# so timing it measures SSAM's overhead over SAM far more precisely than whole steps can on a busy machine

FIRST_STEP_METHODS = ["sam", "ssamf-s0.5", "ssamd-s0.9", "ssamd-s0.5-2of4"]  # element-wise and N:M masks


@pytest.mark.parametrize("method", FIRST_STEP_METHODS)
def test_first_step(benchmark, bench_round, model_name, method, cfg):
    benchmark.group = f"first_step: {model_name}"
    key = ("first_step", model_name, method, cfg["device"], cfg["batch"], cfg["width"])
    first = key not in LIVE
    if first:
        model = fresh_model(model_name, cfg)
        x, y = common.batch(cfg["batch"], cfg["device"])
        opt, tcfg = common.make_optimizer(model, common.METHODS[method][0], num_samples=cfg["batch"])
        if tcfg.optimizer == "ssamf":
            opt.update_mask(model, [(x, y)])
        params = list(model.parameters())
        grads = list(torch.autograd.grad(F.cross_entropy(model(x), y), params))
        LIVE[key] = model, opt, params, grads
    model, opt, params, grads = LIVE[key]

    def setup():  # untimed: back to w, a fresh gradient in p.grad
        opt.restore()
        for p, g in zip(params, grads):
            p.grad = g.clone()
        common.sync(cfg["device"])

    benchmark.pedantic(
        run_sync,
        args=(opt.first_step, cfg["device"]),
        setup=setup,
        rounds=cfg["first_step_calls"],
        warmup_rounds=2 if first else 0,
        iterations=1,
    )
    opt.restore()
    opt.zero_grad(set_to_none=True)
    info(benchmark, model, cfg, bench_round, kind="first_step", model=model_name, method=method)


# ----------------------------------------------------------------------------------------------------------
# Mask updates: SSAM-F's Fisher, and the two update_mask calls


def fisher_data(cfg):
    return common.batch(cfg["fisher_samples"], cfg["device"])


def test_fisher(benchmark, update_round, model_name, cfg):
    benchmark.group = f"mask update: {model_name}"
    n = cfg["fisher_samples"]
    model = fresh_model(model_name, cfg)
    benchmark.pedantic(
        run_sync,
        args=(ssam.empirical_fisher, cfg["device"], model, [fisher_data(cfg)], n),
        rounds=1,
        iterations=1,
    )
    info(benchmark, model, cfg, update_round, kind="fisher", model=model_name, num_samples=n)


def test_ssamf_update_mask(benchmark, update_round, model_name, cfg):
    benchmark.group = f"mask update: {model_name}"
    n = cfg["fisher_samples"]
    model = fresh_model(model_name, cfg)
    opt, _ = common.make_optimizer(model, "--optimizer ssamf --sparsity 0.5", num_samples=n)
    benchmark.pedantic(
        run_sync, args=(opt.update_mask, cfg["device"], model, [fisher_data(cfg)]), rounds=1, iterations=1
    )
    info(
        benchmark,
        model,
        cfg,
        update_round,
        kind="mask-update",
        model=model_name,
        opt="ssamf",
        sparsity=0.5,
        num_samples=n,
    )


def test_ssamd_update_mask(benchmark, update_round, model_name, cfg):
    benchmark.group = f"mask update: {model_name}"
    model = fresh_model(model_name, cfg)
    opt, _ = common.make_optimizer(model, "--optimizer ssamd --sparsity 0.5")
    grads = common.ssamd_grads(
        model, *common.batch(cfg["batch"], cfg["device"])
    )  # step 0: most drops (Eq. 9)
    benchmark.pedantic(
        run_sync, args=(opt.drop_and_grow, cfg["device"], grads), rounds=1, warmup_rounds=1, iterations=1
    )
    info(benchmark, model, cfg, update_round, kind="mask-update", model=model_name, opt="ssamd", sparsity=0.5)
