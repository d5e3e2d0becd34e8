"""SAM-k and LookSAM-k (ascent_every=k, looksam_alpha): the ascent every k steps, one pass between. Oracles
written from the equations on flat float64 vectors, never from ssam.py:
    SAM (Foret et al., Eq. 2): eps = rho g/||g|| (⊙ m for SSAM), descend with g_s = grad L(w + eps);
    LookSAM (Liu et al., CVPR 2022, Alg. 1): on the ascent step g_v = g_s - (g_s·g / ||g||²) g; on the k-1
    steps between, descend with g + alpha·(||g|| / ||g_v||)·g_v; SAM-k: alpha = 0, plain g.
The base step is SGD with momentum and weight decay, written out: b <- mu b + (d + wd w), w <- w - lr b."""

import io
import pathlib
import runpy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ssam
import train

LR, MU, WD, RHO = 0.1, 0.9, 5e-3, 0.05
NO_AMP = torch.autocast("cpu", enabled=False)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def batches(n=8, size=16):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 6, generator=g).double(), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n)
    ]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def grad_at(model, w, x, y):
    """grad L at the flat weights w (torch.func.functional_call: the model itself is not touched)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    parts = [
        t.view(s).detach().requires_grad_() for t, s in zip(w.split([s.numel() for s in shapes]), shapes)
    ]
    loss = F.cross_entropy(torch.func.functional_call(model, dict(zip(names, parts)), (x,)), y)
    return flat(torch.autograd.grad(loss, parts))


def per_tensor(model, v):
    return v.split([p.numel() for p in model.parameters()])


def oracle(model, data, k, alpha, mask=None):
    """The weights after each step, from the equations (flat vectors; LookSAM's per tensor t)."""
    w, b, gv, out = flat(p.detach() for p in model.parameters()), None, None, []
    for t, (x, y) in enumerate(data):
        g = grad_at(model, w, x, y)
        if t % k == 0:  # the ascent step: SAM's (SSAM's with a mask)
            eps = RHO * g / g.norm()  # Eq. 2, over all parameters
            gs = grad_at(model, w + (eps if mask is None else eps * mask), x, y)
            # LookSAM: g_v,t = g_s,t - (g_s,t·g_t / ||g_t||^2) g_t, the part of g_s,t orthogonal to g_t
            gv = flat(a - (a @ c) / (c @ c) * c for a, c in zip(per_tensor(model, gs), per_tensor(model, g)))
            d = gs
        elif alpha:  # g_t + alpha ||g_t|| / ||g_v,t|| g_v,t
            d = flat(
                c + alpha * c.norm() / v.norm() * v
                for c, v in zip(per_tensor(model, g), per_tensor(model, gv))
            )
        else:
            d = g
        d = d + WD * w
        b = d if b is None else MU * b + d
        w = w - LR * b
        out.append(w)
    return out


def make(model, k, alpha, sparse=False, **kw):
    sgd = dict(lr=LR, momentum=MU, weight_decay=WD, rho=RHO, ascent_every=k, looksam_alpha=alpha)
    if sparse:
        return ssam.SSAMF(model.parameters(), torch.optim.SGD, sparsity=0.5, **sgd, **kw)
    return ssam.SAM(model.parameters(), torch.optim.SGD, **sgd, **kw)


def loop_step(model, opt, x, y):
    """The README's loop: pass 1, then the second pass only when opt.ascent_due."""
    F.cross_entropy(model(x), y).backward()
    if opt.ascent_due:
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    else:
        opt.step()  # no closure, no first_step: the cheap descent
        opt.zero_grad()


@pytest.mark.parametrize(
    "k, alpha, sparse", [(3, 0.0, False), (3, 0.7, False), (2, 1.5, True), (1, 0.7, False), (4, 0.7, True)]
)
def test_every_k_matches_the_equations(k, alpha, sparse):
    """SAM-k, LookSAM-k, and both with an element-wise SSAM mask, against the oracle at every step."""
    model, data = mlp(), batches()
    opt = make(model, k, alpha, sparse)
    mask = None
    if sparse:  # a fixed random element-wise mask at density 0.5
        g = torch.Generator().manual_seed(2)
        masks = [torch.rand(p.shape, generator=g, dtype=torch.float64) < 0.5 for p in model.parameters()]
        opt.set_masks(masks)
        mask = flat(masks).double()
    want = oracle(mlp(), data, k, alpha, mask)
    for t, (x, y) in enumerate(data):
        assert opt.ascent_due == (t % k == 0)
        loop_step(model, opt, x, y)
        torch.testing.assert_close(
            flat(p.detach() for p in model.parameters()), want[t], atol=1e-8, rtol=1e-6
        )
    assert opt.steps == len(data)


def test_k1_is_exactly_sam_and_the_oracle_can_tell_k_apart():
    """ascent_every=1 (any alpha) is SAM's step bit for bit, with SSAM-D at sparsity 0 too; SAM-3 is not SAM
    (the oracle test can fail)."""
    data = batches(4)
    runs = {}
    for name, kw in (
        ("sam", {}),
        ("k1", dict(ascent_every=1, looksam_alpha=0.7)),
        ("ssamd-s0-k1", dict(ascent_every=1, looksam_alpha=0.7, sparsity=0.0, total_steps=4, seed=0)),
        ("k3", dict(ascent_every=3)),
    ):
        model = mlp()
        cls = ssam.SSAMD if "sparsity" in kw else ssam.SAM
        opt = cls(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MU, weight_decay=WD, **kw)
        for x, y in data:
            loop_step(model, opt, x, y)
        runs[name] = flat(p.detach() for p in model.parameters())
    assert torch.equal(runs["k1"], runs["sam"]) and torch.equal(runs["ssamd-s0-k1"], runs["sam"])
    assert not torch.allclose(runs["k3"], runs["sam"])


@pytest.mark.parametrize("both_passes", [False, True])
def test_step_with_a_closure_skips_its_second_call_between_ascents(both_passes):
    """davda54's opt.step(closure) (and both_passes) on LookSAM-3: the closure runs once per pass that is
    needed (an ascent step: 2 passes; between: 1, or 0 when pass 1 was the caller's), the weights are the
    plain loop's bit for bit; between ascents the call returns None (no second pass) or pass 1's loss."""
    data = batches(6)
    a, b = mlp(), mlp()
    oa, ob = make(a, 3, 0.7), make(b, 3, 0.7)
    calls = []
    for t, (x, y) in enumerate(data):
        loop_step(a, oa, x, y)

        def closure():
            calls.append(t)
            loss = F.cross_entropy(b(x), y)
            loss.backward()
            return loss

        if not both_passes:
            F.cross_entropy(b(x), y).backward()
        out = ob.step(closure, both_passes=both_passes)
        ob.zero_grad()
        assert (out is None) == (not both_passes and t % 3 != 0)
    assert flat(a.parameters()).equal(flat(b.parameters()))
    per_step = [calls.count(t) for t in range(6)]
    assert per_step == ([2, 1, 1] * 2 if both_passes else [1, 0, 0] * 2)


def test_misuse_is_refused_with_nothing_changed():
    model, (x, y) = mlp(), batches(1)[0]
    for bad in (
        dict(ascent_every=0),
        dict(ascent_every=2.5),
        dict(looksam_alpha=-0.1),
        dict(looksam_alpha=float("nan")),
    ):
        with pytest.raises(ValueError, match="ascent_every|looksam_alpha"):
            ssam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, **bad)
    opt = make(model, 2, 0.7)
    loop_step(model, opt, x, y)  # step 0: the ascent
    assert not opt.ascent_due
    F.cross_entropy(model(x), y).backward()
    w, grads = flat(model.parameters()).clone(), flat(p.grad for p in model.parameters()).clone()
    with pytest.raises(ValueError, match="ascent_due"):
        opt.first_step()  # step 1 has no ascent: one pass and opt.step()
    assert flat(model.parameters()).equal(w) and flat(p.grad for p in model.parameters()).equal(grads)
    assert opt._w is None and opt.steps == 1
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # step 2: the ascent is due again
    w = flat(model.parameters()).clone()
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    assert opt.steps == 2 and opt.ascent_due and flat(model.parameters()).equal(w)


def test_resume_mid_period_is_bit_exact_and_needs_g_v():
    """LookSAM-3 over SSAM-D masks (a generator, masks, g_v, the phase): 4 steps, state_dict through bytes,
    a new model and optimizer, 4 more steps = 8 steps straight, bit for bit. The saved g_v matters: loading
    the state without it gives other weights."""
    data = batches(8)

    def build():
        model = mlp()
        opt = ssam.SSAMD(
            model.parameters(), torch.optim.SGD, rho=RHO, sparsity=0.5, total_steps=8, update_interval=2,
            seed=0, lr=LR, momentum=MU, weight_decay=WD, ascent_every=3, looksam_alpha=0.7,
        )  # fmt: skip
        return model, opt

    straight, so = build()
    for x, y in data:
        loop_step(straight, so, x, y)
    first, fo = build()
    for x, y in data[:4]:
        loop_step(first, fo, x, y)
    buf = io.BytesIO()
    torch.save(dict(model=first.state_dict(), opt=fo.state_dict()), buf)
    results = []
    for drop_gv in (False, True):
        buf.seek(0)
        ck = torch.load(buf, weights_only=True)
        if drop_gv:
            for s in ck["opt"]["state"].values():
                s.pop("g_v")
        model, opt = build()
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        assert opt.steps == 4 and not opt.ascent_due  # phase 1 of 3
        for x, y in data[4:]:
            loop_step(model, opt, x, y)
        results.append(flat(model.parameters()))
        if not drop_gv:
            assert all(m.equal(n) for m, n in zip(opt.masks(), so.masks()))
            assert opt.state_dict()["state"].keys() == so.state_dict()["state"].keys()
    assert results[0].equal(flat(straight.parameters()))
    assert not results[1].equal(results[0])


def test_ssamd_draws_its_due_mask_on_the_next_ascent():
    """SSAM-D's drop-and-grow happens inside first_step: with update_interval 2 and k=3 it lands on steps
    0, 3, 6 (the first ascent once due), never between."""
    model, data = mlp(), batches(8)
    opt = ssam.SSAMD(
        model.parameters(), torch.optim.SGD, rho=RHO, sparsity=0.5, total_steps=8, update_interval=2, seed=0,
        lr=LR, ascent_every=3,
    )  # fmt: skip
    seen = []
    for x, y in data:
        loop_step(model, opt, x, y)
        seen.append(opt.last_mask_update)
    assert seen == [0, 0, 0, 3, 3, 3, 6, 6]


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10),
    )  # fmt: skip


@pytest.mark.parametrize(
    "structure, costs", [(None, False), ("2:4", False), ("tensor", False), ("tensor", True)]
)
@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_train_step_composes_with_every_mask_mode_and_ascent_fraction(structure, costs, fraction):
    """train.train_step with LookSAM-3 over SSAM-D masks of every kind and --ascent-fraction: forward passes
    [ascent (on f of the batch), descent] on ascent steps and one full pass between; the stored g_v is
    orthogonal to the gradient at w of the tensors the ascent saw (Alg. 1); a step between ascents is the
    base step with g + alpha·||g||/||g_v||·g_v, g computed here on its own, and leaves the masks alone."""
    model = convnet()
    x_all = torch.randn(6, 8, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    y_all = torch.randint(0, 10, (6, 8), generator=torch.Generator().manual_seed(4))
    kw = dict(costs=ssam.ascent_costs(model, x_all[0])) if costs else {}
    opt = ssam.SSAMD(
        model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, structure=structure, total_steps=6,
        update_interval=100, seed=0, lr=0.05, momentum=0.9, ascent_every=3, looksam_alpha=0.7,
        norm="masked" if structure == "tensor" else None, **kw,
    )  # fmt: skip
    sizes, k = [], max(1, round(fraction * 8))
    model[0].register_forward_hook(lambda m, inp, o: sizes.append(len(inp[0])))
    for t in range(6):
        x, y = x_all[t], y_all[t]
        params = list(model.parameters())
        with ssam.frozen_bn_stats(model):  # the gradient at w, on what pass 1 of train_step will see
            g = torch.autograd.grad(
                F.cross_entropy(model(x if t % 3 else x[:k]), y if t % 3 else y[:k]), params
            )
        sizes.pop()
        if t % 3:  # between ascents: the oracle's descent direction
            have = [i for i, p in enumerate(params) if "g_v" in opt.state[p]]
            gv = [opt.state[params[i]]["g_v"] for i in have]
            d = [g[i] + 0.7 * g[i].norm() / v.norm() * v for i, v in zip(have, gv)]  # per tensor
            d = [d[have.index(i)] if i in have else g[i] for i in range(len(params))]
            bufs = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in params]
            want = [p.detach() - 0.05 * (0.9 * b_ + di) for p, b_, di in zip(params, bufs, d)]
            masks = [m.clone() for m in opt.masks()]
        train.train_step(model, opt, x, y, NO_AMP, ascent_fraction=fraction)
        if t % 3:
            for p, w in zip(params, want):
                torch.testing.assert_close(p.detach(), w, atol=1e-6, rtol=1e-5)
            assert all(m.equal(n) for m, n in zip(masks, opt.masks()))
        else:  # g_v,t ⊥ g_t at the weights before the step, for each tensor that has one
            have = [i for i, p in enumerate(params) if "g_v" in opt.state[p]]
            assert have and (structure != "tensor" or len(have) < len(params))  # tensor: the perturbed ones
            for i in have:
                gv, gh = opt.state[params[i]]["g_v"].flatten(), g[i].flatten()
                assert abs(gv @ gh) <= 1e-4 * gv.norm() * gh.norm()
    assert sizes == [k, 8, 8, 8] * 2


def test_train_py_flags_names_and_refusals():
    def cfg(*argv):
        return train.resolve_config(train.get_args(list(argv)))

    c = cfg("--optimizer", "ssamf", "--ascent-every", "5", "--looksam-alpha", "0.7")
    assert (c.ascent_every, c.looksam_alpha) == (5, 0.7) and "-k5-a0.7-" in c.name
    assert cfg("--optimizer", "sam").ascent_every == 1 and "-k" not in cfg("--optimizer", "sam").name
    with pytest.raises(SystemExit, match="needs --ascent-every"):
        cfg("--optimizer", "sam", "--looksam-alpha", "0.7")
    with pytest.raises(SystemExit, match="would be ignored"):
        cfg("--ascent-every", "5")  # SGD has no ascent
    with pytest.raises(SystemExit, match="--ascent-every 0"):
        cfg("--optimizer", "sam", "--ascent-every", "0")
    with pytest.raises(SystemExit, match="--fsdp with --looksam-alpha"):
        cfg("--optimizer", "sam", "--fsdp", "--sync-ascent", "--ascent-every", "2", "--looksam-alpha", "0.7")


# ---- the examples: GradScaler (amp.py) and accumulation (accumulation.py) follow opt.ascent_due ---------
EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def example(name):
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"examples.{name}")


@pytest.mark.parametrize("clip", [None, 0.05])
def test_amp_example_with_looksam_equals_the_fp32_loop_bitwise(clip):
    """LookSAM-3 through amp.py's sam_step, a fixed power-of-2 scale (exact): the fp32 loop's weights bit for
    bit, clipping (of the descent gradient) included; an inf in the pass of a step between ascents skips it:
    w exact, not counted, the scale halved, and the next step runs as the loop's."""
    sam_step = example("amp")["sam_step"]
    a, b = mlp().float(), mlp().float()
    oa, ob = make(a, 3, 0.7), make(b, 3, 0.7)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**9)

    def fp32_step(x, y):
        F.cross_entropy(a(x), y).backward()
        if oa.ascent_due:
            oa.first_step(zero_grad=True)
            F.cross_entropy(a(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(a.parameters(), clip)
        oa.step()  # second_step after first_step, else the step between ascents
        oa.zero_grad()

    data = [(x.float(), y) for x, y in batches(7)]
    for x, y in data[:5]:
        sam_step(b, ob, scaler, x, y, clip=clip)
        fp32_step(x, y)
    assert flat(a.parameters()).equal(flat(b.parameters())) and ob.steps == 5
    w = flat(b.parameters()).clone()
    sam_step(b, ob, scaler, data[5][0] * float("inf"), data[5][1], clip=clip)  # step 5: no ascent, overflows
    assert flat(b.parameters()).equal(w) and ob.steps == 5 and scaler.get_scale() == 2.0**11
    sam_step(b, ob, scaler, *data[6], clip=clip)
    fp32_step(*data[6])
    assert flat(a.parameters()).equal(flat(b.parameters()))


def test_accumulation_example_with_looksam_equals_one_full_batch_step():
    """LookSAM-2 through accumulation.py, 4 micro-batches of 4 (float64): the full-batch loop, to 1e-12."""
    step = example("accumulation")["sam_step_accumulated"]
    a, b = mlp(), mlp()
    oa, ob = make(a, 2, 0.7), make(b, 2, 0.7)
    for x, y in batches(5):
        step(b, ob, list(zip(x.chunk(4), y.chunk(4))))
        loop_step(a, oa, x, y)
    torch.testing.assert_close(flat(b.parameters()), flat(a.parameters()), atol=1e-12, rtol=0)
    assert ob.steps == 5 and "g_v" in ob.state[next(b.parameters())]


def test_train_py_crash_and_resume_mid_period_is_bit_exact(straight_and_resumed):
    """train.py, SSAM-D with LookSAM-3 (4 steps an epoch: epoch 2 starts at phase 1 of 3), crashing inside
    epoch 2, then --resume: the same weights, counters and test accuracy as the run straight through."""
    argv = "--model wrn10-1 --batch-size 8 --train-size 32 --epochs 2 --eval-every 2 --optimizer ssamd"
    argv = (argv + " --update-interval 2 --ascent-every 3 --looksam-alpha 0.7").split()

    def cfg(*more):
        return train.resolve_config(train.get_args([*argv, *more]))

    a, b, ca, cb = straight_and_resumed(cfg, crash_at=4 + 2)  # step 2 of epoch 2
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    ka, kb = ca["optimizer"]["counters"], cb["optimizer"]["counters"]
    assert (
        a["test_acc"] == b["test_acc"] and torch.equal(ka.pop("generator"), kb.pop("generator")) and ka == kb
    )
    assert ka["steps"] == 8 and any("g_v" in s for s in ca["optimizer"]["state"].values())


def _ddp_looksam_worker(rank, world, init_file, result_file):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        model = convnet()  # the same weights on both processes
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = ssam.SAM(
            model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, ascent_every=2, looksam_alpha=0.7
        )
        g = torch.Generator().manual_seed(100 + rank)  # different data on each process
        for _ in range(4):  # the ascent under no_sync: each process its own g at w, hence its own g_v
            x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
            train.train_step(ddp, opt, x, y, NO_AMP)
        torch.save(flat(model.parameters()), f"{result_file}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_local_ascents_share_one_g_v(tmp_path):
    """DDP with the ascent under no_sync (train.py's default): g_v, averaged over the processes in
    second_step, is the same everywhere, so the steps between ascents keep the weights identical."""
    torch.multiprocessing.spawn(
        _ddp_looksam_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2
    )
    assert torch.equal(*(torch.load(tmp_path / f"out.{r}") for r in (0, 1)))
