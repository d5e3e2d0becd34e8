"""Unit tests for ssam.py: SAM / ASAM / SSAM-F / SSAM-D against references written here from the paper
(Mi et al., NeurIPS 2022, Eq. 2, 5-9, Alg. 1-2), the mask logic, exact restore, resume, errors, helpers.

Everything runs on the CPU with tiny models in a few seconds per test."""

import copy
import io
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ssam
import train as train_py

SSAM_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ssam.py")


# ----------------------------------------------------------------------------------------------------
# tiny models, data, one training step


def mlp(seed=0, dtype=torch.float32):
    """tanh MLP: no dead units, so gradients (and |g| rankings) have no exact ties."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)


def convbn(seed=0, dtype=torch.float32):
    """Tiny convnet with BatchNorm2d on 5x5 features (batch-1 train-mode BN works)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    with torch.no_grad():  # non-trivial BN affine params and running stats
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net.to(dtype)


def nm_net(seed=0):
    """Conv (out 8: 2:4-eligible), BN (1-D), conv (out 6: ineligible), Linear(6, 4) (eligible)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Tanh(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


def img_batch(seed, n=8, dtype=torch.float32, classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 5, 5, generator=g).to(dtype), torch.randint(0, classes, (n,), generator=g)


def vec_batch(seed, n=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g).to(dtype), torch.randint(0, 4, (n,), generator=g)


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def sam_step(model, opt, x, y):
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    with ssam.frozen_bn_stats(model):
        loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)


def snapshot(model):
    return [t.detach().clone() for t in model.state_dict().values()]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape, i
        assert torch.equal(u, v), (
            f"tensor {i} differs, max |diff| {(u.double() - v.double()).abs().max().item()}"
        )


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


# ----------------------------------------------------------------------------------------------------
# 1. equivalence with an independent re-implementation of Eq. 2 + masks + SGD(momentum, weight decay)


class RefSGD:
    """torch.optim.SGD(momentum, weight_decay, dampening=0, nesterov=False), written out."""

    def __init__(self, params, lr, momentum, weight_decay):
        self.params, self.lr, self.mom, self.wd = params, lr, momentum, weight_decay
        self.buf = [None] * len(params)

    @torch.no_grad()
    def step(self, grads):
        for i, (p, g) in enumerate(zip(self.params, grads)):
            d = g + self.wd * p
            self.buf[i] = d.clone() if self.buf[i] is None else self.mom * self.buf[i] + d
            p.sub_(self.lr * self.buf[i])


def ref_sam_step(model, sgd, x, y, rho, masks=None, adaptive=False):
    """eps = rho * g / (||g||_2 + 1e-12) ⊙ m over ALL parameters (ASAM: rho * w^2 g / (||w g|| + 1e-12) ⊙ m);
    gradient at w + eps with BN batch statistics and no running-stat update; restore; SGD step."""
    params = sgd.params
    g = torch.autograd.grad(loss_of(model, x, y), params)
    with torch.no_grad():
        if adaptive:
            norm = math.sqrt(sum(float(((p * gi) ** 2).sum()) for p, gi in zip(params, g)))
            eps = [rho * p * p * gi / (norm + 1e-12) for p, gi in zip(params, g)]
        else:
            norm = math.sqrt(sum(float((gi**2).sum()) for gi in g))
            eps = [rho * gi / (norm + 1e-12) for gi in g]
        if masks is not None:
            eps = [e * m.to(e.dtype) for e, m in zip(eps, masks)]
        w = [p.clone() for p in params]
        for p, e in zip(params, eps):
            p.add_(e)
    buffers = [b.clone() for b in model.buffers()]
    g2 = torch.autograd.grad(loss_of(model, x, y), params)
    with torch.no_grad():
        for b, b0 in zip(model.buffers(), buffers):
            b.copy_(b0)
        for p, w0 in zip(params, w):
            p.copy_(w0)
    sgd.step(g2)


def make_opt(kind, params, **kw):
    base = dict(rho=0.2, lr=0.1, momentum=0.9, weight_decay=5e-3)
    base.update(kw)
    if kind == "sam":
        return ssam.SAM(params, torch.optim.SGD, **base)
    if kind == "ssamf":
        return ssam.SSAMF(params, torch.optim.SGD, sparsity=0.6, num_samples=12, update_interval=2, **base)
    if kind == "ssamd":
        return ssam.SSAMD(
            params,
            torch.optim.SGD,
            sparsity=0.6,
            update_interval=2,
            total_steps=10,
            drop_rate=0.5,
            seed=3,
            **base,
        )
    raise AssertionError(kind)


def fisher_topk_masks(model, data, num_samples, density):
    """SSAM-F's mask by hand: the batch-1 loop's Fisher (Eq. 5), its global top round(density * |w|) (Eq.
    6)."""
    fisher = loop_fisher(model, data, num_samples)
    fl = flat(fisher)
    keep = torch.zeros(fl.numel(), dtype=torch.bool)
    keep[torch.topk(fl, round(density * fl.numel())).indices] = True
    return [m.reshape(f.shape) for m, f in zip(keep.split([f.numel() for f in fisher]), fisher)]


def check_drop_and_grow(old, new, g, n_drop):
    """SSAM-D by hand: the n_drop perturbed entries of smallest |g| leave (Eq. 7), every other perturbed entry
    stays, and as many entries grow (Eq. 8, at random: any set of that size)."""
    score = torch.where(old, g.abs(), torch.tensor(math.inf, dtype=g.dtype))
    kept = old.clone()
    kept[torch.argsort(score)[:n_drop]] = False
    assert not (kept & ~new).any(), "an entry outside the n_drop smallest |g| was dropped"
    assert int(new.sum()) == int(old.sum()) and int((old & ~new).sum()) <= n_drop


@pytest.mark.parametrize(
    "kind,adaptive", [("sam", False), ("sam", True), ("ssamf", False), ("ssamd", False), ("ssamd", True)]
)
def test_matches_reference_implementation(kind, adaptive):
    """The reference computes its own SSAM-F mask (loop Fisher, top-k) and checks SSAM-D's drop (Eq. 7, N_drop
    from Eq. 9 with s = 0.6, alpha = 0.5, T = 10) against the first pass's gradient; SSAM-D's random growth is
    the one input it takes from the optimizer."""
    model = convbn(0, torch.float64)
    ref = copy.deepcopy(model)
    opt = make_opt(kind, model.parameters(), adaptive=adaptive)
    rsgd = RefSGD(list(ref.parameters()), lr=0.1, momentum=0.9, weight_decay=5e-3)
    fisher_data = [img_batch(100, 6, torch.float64), img_batch(101, 6, torch.float64)]
    d = sum(p.numel() for p in model.parameters())
    masks, used = None, []
    for t in range(5):
        x, y = img_batch(t, dtype=torch.float64)
        if kind == "ssamf" and t % 2 == 0:  # update_interval=2
            opt.update_mask(model, fisher_data)
            masks = fisher_topk_masks(ref, fisher_data, 12, 0.4)
        old = flat(opt.masks()).clone() if kind == "ssamd" else None
        loss_of(model, x, y).backward()
        g = flat([p.grad for p in model.parameters()]).clone()
        opt.first_step(zero_grad=True)
        if kind == "ssamd":
            new = flat(opt.masks())
            if t in (2, 4):  # update_interval=2 from the initial mask (step 0)
                check_drop_and_grow(old, new, g, int(0.25 * (1 + math.cos(math.pi * t / 10)) * 0.4 * d))
            else:
                assert torch.equal(old, new)
            masks = [m.clone() for m in opt.masks()]
        if kind != "sam":
            assert [torch.equal(m, r) for m, r in zip(opt.masks(), masks)] == [True] * len(masks)
            assert 0 < int(flat(masks).sum()) < d
            used.append(flat(masks))
        with ssam.frozen_bn_stats(model):
            loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
        ref_sam_step(ref, rsgd, x, y, rho=0.2, masks=masks, adaptive=adaptive)
    assert opt.steps == 5
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-10)
    for b, c in zip(model.buffers(), ref.buffers()):  # running stats follow the first pass only
        torch.testing.assert_close(b, c, rtol=0, atol=1e-10)
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), convbn(0).parameters()))
    assert moved > 1e-2  # the run did something
    if kind != "sam":
        assert any(not torch.equal(used[0], u) for u in used[1:])  # the masks changed within the run


def test_per_group_rho_and_unused_parameter_match_reference():
    """rho may differ between param groups (norm still over all grads); a parameter without .grad is
    skipped."""
    model = mlp(0)
    unused = nn.Parameter(torch.randn(3))
    ref = copy.deepcopy(model)
    groups = [
        {"params": list(model[0].parameters()) + [unused], "rho": 0.5},
        {"params": list(model[2].parameters()) + list(model[4].parameters())},
    ]
    opt = ssam.SAM(groups, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3)
    u0 = unused.detach().clone()
    rp = list(ref.parameters())
    rsgd = RefSGD(rp, 0.1, 0.9, 1e-3)
    for t in range(3):
        x, y = vec_batch(t)
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
        # reference with rho 0.5 on the first layer, 0.1 elsewhere
        g = torch.autograd.grad(loss_of(ref, x, y), rp)
        norm = math.sqrt(sum(float((gi**2).sum()) for gi in g))
        rhos = [0.5, 0.5, 0.1, 0.1, 0.1, 0.1]
        with torch.no_grad():
            w = [p.clone() for p in rp]
            for p, gi, r in zip(rp, g, rhos):
                p.add_(r * gi / (norm + 1e-12))
        g2 = torch.autograd.grad(loss_of(ref, x, y), rp)
        with torch.no_grad():
            for p, w0 in zip(rp, w):
                p.copy_(w0)
        rsgd.step(g2)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
    assert torch.equal(unused.detach(), u0)


# ----------------------------------------------------------------------------------------------------
# 2. sparsity 0 is SAM, sparsity 1 is the base optimizer, bit for bit


def _run(model, opt, steps, kind=None, fisher_data=None):
    for t in range(steps):
        x, y = img_batch(t)
        if kind == "ssamf" and opt.mask_update_due:
            opt.update_mask(model, fisher_data)
        sam_step(model, opt, x, y)


@pytest.mark.parametrize("kind", ["ssamf", "ssamd"])
def test_sparsity_zero_is_sam_exactly(kind):
    fisher_data = [img_batch(100, 12)]
    kw = dict(rho=0.3, lr=0.1, momentum=0.9, weight_decay=1e-3)
    a = convbn(0)
    _run(a, ssam.SAM(a.parameters(), torch.optim.SGD, **kw), 3)
    b = convbn(0)
    if kind == "ssamf":
        opt = ssam.SSAMF(
            b.parameters(), torch.optim.SGD, sparsity=0.0, num_samples=12, update_interval=1, **kw
        )
    else:
        opt = ssam.SSAMD(
            b.parameters(), torch.optim.SGD, sparsity=0.0, update_interval=1, total_steps=3, seed=0, **kw
        )
    _run(b, opt, 3, kind, fisher_data)
    assert all(bool(m.all()) for m in opt.masks())
    assert_bitwise(snapshot(a), snapshot(b))


@pytest.mark.parametrize("kind", ["ssamf", "ssamd"])
def test_sparsity_one_is_plain_sgd_exactly(kind):
    fisher_data = [img_batch(100, 12)]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    a = convbn(0)
    sgd = torch.optim.SGD(a.parameters(), **kw)
    for t in range(3):
        x, y = img_batch(t)
        loss_of(a, x, y).backward()
        sgd.step()
        sgd.zero_grad()
    b = convbn(0)
    if kind == "ssamf":
        opt = ssam.SSAMF(
            b.parameters(), torch.optim.SGD, rho=0.3, sparsity=1.0, num_samples=12, update_interval=1, **kw
        )
    else:
        opt = ssam.SSAMD(
            b.parameters(),
            torch.optim.SGD,
            rho=0.3,
            sparsity=1.0,
            update_interval=1,
            total_steps=3,
            seed=0,
            **kw,
        )
    _run(b, opt, 3, kind, fisher_data)
    assert not any(bool(m.any()) for m in opt.masks())
    assert_bitwise(snapshot(a), snapshot(b))


# ----------------------------------------------------------------------------------------------------
# 3. exact restore


@pytest.mark.parametrize("kind", ["sam", "ssamd"])
def test_restore_is_bit_exact(kind):
    model = convbn(0)
    opt = make_opt(kind, model.parameters(), rho=0.7, lr=0.0, momentum=0.0, weight_decay=0.0)
    x, y = img_batch(0)
    w = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=False)
    eps = [p.grad.clone() for p in model.parameters()]
    perturbed = [p.detach().clone() for p in model.parameters()]
    masks = (
        opt.masks() if kind == "ssamd" else [torch.ones_like(p, dtype=torch.bool) for p in model.parameters()]
    )
    changed = 0
    for p, w0, m in zip(perturbed, w, masks):
        assert torch.equal(p[~m], w0[~m])  # unperturbed entries untouched
        changed += int((p != w0)[m].sum())
    assert changed > 0.9 * int(flat(masks).sum())  # perturbed entries moved
    # the test can tell an exact restore from (w + eps) - eps
    assert any(not torch.equal(p - e, w0) for p, e, w0 in zip(perturbed, eps, w))
    opt.restore()
    assert_bitwise([p.detach() for p in model.parameters()], w)
    opt.restore()  # no-op when not perturbed
    assert_bitwise([p.detach() for p in model.parameters()], w)

    # second_step restores too: with lr=0 and no momentum / weight decay, w comes back exactly
    opt.zero_grad()
    sam_step(model, opt, x, y)
    assert_bitwise([p.detach() for p in model.parameters()], w)


# ----------------------------------------------------------------------------------------------------
# 4. empirical Fisher (Eq. 5) and the SSAM-F mask (Eq. 6)


def loop_fisher(model, data, num_samples, loss_fn=F.cross_entropy):
    """The authors' loop: batch-1 forward/backward on a copy, sum of grad**2."""
    net = copy.deepcopy(model)
    ps = list(net.parameters())
    acc = [torch.zeros_like(p) for p in ps]
    seen = 0
    for x, y in data:
        for i in range(len(x)):
            if seen == num_samples:
                break
            g = torch.autograd.grad(loss_fn(net(x[i : i + 1]), y[i : i + 1]), ps)
            for a, gi in zip(acc, g):
                a += gi**2
            seen += 1
    assert seen == num_samples
    return acc


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_empirical_fisher_matches_batch1_loop_and_touches_nothing(mode):
    model = convbn(0, torch.float64).train(mode == "train")
    data = [img_batch(s, 5, torch.float64) for s in (10, 11, 12)]  # 12 samples span 3 batches
    loss_fn = (
        F.cross_entropy if mode == "train" else (lambda out, y: 3 * F.nll_loss(F.log_softmax(out, -1), y))
    )
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in model.parameters()]
    state = snapshot(model)  # params + running_mean/var + num_batches_tracked

    fisher = ssam.empirical_fisher(model, data, 12, loss_fn=loss_fn)
    expected = loop_fisher(model, data, 12, loss_fn)

    assert set(map(id, fisher)) == set(map(id, model.parameters()))
    for p, e in zip(model.parameters(), expected):
        assert fisher[p].shape == p.shape
        torch.testing.assert_close(fisher[p], e, rtol=1e-9, atol=1e-15)
    assert all(float(e.abs().max()) > 0 for e in expected)
    assert_bitwise(snapshot(model), state)
    assert_bitwise([p.grad for p in model.parameters()], grads)
    assert model.training == (mode == "train")


def test_empirical_fisher_stops_inside_a_batch():
    model = mlp(0, torch.float64)
    x, y = vec_batch(0, 40, torch.float64)
    fisher = ssam.empirical_fisher(model, [(x, y)], 37)  # 37 of the batch's 40
    for p, e in zip(model.parameters(), loop_fisher(model, [(x, y)], 37)):
        torch.testing.assert_close(fisher[p], e, rtol=1e-9, atol=1e-15)


def test_empirical_fisher_of_softmax_regression_has_a_closed_form():
    """An independent reference: for y = Wx + b under cross-entropy, sample i's gradient is (p_i - e_yi) x_i^T
    for W and p_i - e_yi for b, so Eq. 5 is a sum of their squares (no autograd in the reference)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    with torch.no_grad():
        r = torch.softmax(model(x), -1) - F.one_hot(y, 3).double()  # [8, 3]: p_i - e_yi
    fisher = ssam.empirical_fisher(model, [(x[:3], y[:3]), (x[3:], y[3:])], 8)
    torch.testing.assert_close(
        fisher[model.weight], torch.einsum("io,ij->oj", r**2, x**2), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(fisher[model.bias], (r**2).sum(0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("frozen", ["bn_eval_in_train_model", "bn_train_in_eval_model"])
def test_empirical_fisher_respects_each_batchnorm_modes(frozen):
    """Beyond the brief: a model in train mode whose BatchNorm is frozen (bn.eval(), common when fine-tuning),
    and the reverse. The batch-1 loop the docstring cites normalizes each BN by ITS mode."""
    model = convbn(0, torch.float64)
    if frozen == "bn_eval_in_train_model":
        model.train()
        model[1].eval()
    else:
        model.eval()
        model[4].train()
    data = [img_batch(10, 6, torch.float64)]
    state = snapshot(model)
    fisher = ssam.empirical_fisher(model, data, 6)
    for p, e in zip(model.parameters(), loop_fisher(model, data, 6)):
        torch.testing.assert_close(fisher[p], e, rtol=1e-9, atol=1e-15)
    assert_bitwise(snapshot(model), state)


class _ToSeq(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], 5, 15)


def fisher_arch(name):
    torch.manual_seed(0)
    if name == "conv_stride_dilation_groupnorm":
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(6, 4, 2, dilation=2, padding=1),
            nn.GroupNorm(2, 4),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(36, 4),
        )
    if name == "sequence_linear_layernorm":  # Linear on [b, seq, features]
        return nn.Sequential(
            _ToSeq(),
            nn.Linear(15, 8),
            nn.LayerNorm(8),
            nn.Tanh(),
            nn.Linear(8, 4),
            nn.Flatten(),
            nn.Linear(20, 4),
        )
    if name == "grouped_conv_batchnorm":
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, groups=3),
            nn.BatchNorm2d(6),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 4),
        )
    if name == "linear_called_twice":  # one module applied twice in forward (tied weights)
        shared = nn.Linear(6, 6)
        return nn.Sequential(
            nn.Flatten(), nn.Linear(75, 6), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(6, 4)
        )
    if name == "batchnorm_without_running_stats":
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4, track_running_stats=False),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 4),
        )
    raise AssertionError(name)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "name",
    [
        "conv_stride_dilation_groupnorm",
        "sequence_linear_layernorm",
        "grouped_conv_batchnorm",
        "linear_called_twice",
        "batchnorm_without_running_stats",
    ],
)
def test_empirical_fisher_matches_batch1_loop_on_more_architectures(name, mode):
    model = fisher_arch(name).double()
    with torch.no_grad():
        model(img_batch(99, 4, torch.float64)[0])  # BN running stats away from 0 / 1
    model.train(mode == "train")
    data = [img_batch(s, 5, torch.float64) for s in (40, 41)]
    state = snapshot(model)
    fisher = ssam.empirical_fisher(model, data, 9)
    expected = loop_fisher(model, data, 9)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(fisher[p], e, rtol=1e-9, atol=1e-15)
    assert_bitwise(snapshot(model), state)


@pytest.mark.parametrize("s", [0.3, 0.75])
def test_ssamf_mask_is_global_topk_of_fisher(s):
    model = convbn(0, torch.float64)
    data = [img_batch(20, 6, torch.float64), img_batch(21, 6, torch.float64)]
    opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, sparsity=s, num_samples=10, lr=0.1)
    w = snapshot(model)
    opt.update_mask(model, data)
    assert opt.last_mask_update == 0 and not opt.mask_update_due
    assert_bitwise(snapshot(model), w)

    params = list(model.parameters())
    fisher = ssam.empirical_fisher(model, data, 10)
    fl = flat([fisher[p] for p in params])
    d = fl.numel()
    k = round((1 - s) * d)
    expected = torch.zeros(d, dtype=torch.bool)
    expected[torch.topk(fl, k).indices] = True
    masks = opt.masks()
    assert all(m.dtype == torch.bool and m.shape == p.shape for m, p in zip(masks, params))
    got = flat(masks)
    assert int(got.sum()) == k
    assert torch.equal(got, expected)
    assert fl[got].min() >= fl[~got].max()
    assert opt.density() == k / d
    # and against the independent loop Fisher: the mask holds the k largest up to float noise
    lf = flat(loop_fisher(model, data, 10))
    assert lf[got].min() >= lf[~got].max() * (1 - 1e-6)


# ----------------------------------------------------------------------------------------------------
# 5. SSAM-D drop and grow (Eq. 7-9)


def test_drop_count_follows_eq9():
    """N_drop(t) = f_decay(t; alpha) (1 - s) |w| with f_decay = alpha / 2 (1 + cos(pi t / T)) (Eq. 9, Alg. 2),
    rounded down; |w| = 224 for the MLP (6*12 + 12 + 12*8 + 8 + 8*4 + 4). The values by hand, e.g. s = 0.5,
    alpha = 0.5, T = 30, t = 5: 0.25 (1 + cos(pi / 6)) 112 = 28 * 1.8660 = 52.25 -> 52."""
    model = mlp(0)
    table = {
        (0.5, 0.5, 30): {0: 56, 5: 52, 25: 3, 30: 0, 60: 56},  # 28 (1 + cos): 56, 52.25, 3.75, 0; t = 2T: 56
        (0.8, 0.3, 7): {0: 13, 3: 8, 7: 0, 14: 13},  # 6.72 (1 + cos): 13.44, 8.215, 0, 13.44
        (0.1, 1.0, 100): {0: 201, 50: 100, 100: 0},  # 100.8 (1 + cos): 201.6, 100.8, 0
    }
    for (s, alpha, T), expected in table.items():
        opt = ssam.SSAMD(
            model.parameters(), torch.optim.SGD, sparsity=s, drop_rate=alpha, total_steps=T, seed=0, lr=0.1
        )
        assert {t: opt.drop_count(t) for t in expected} == expected, (s, alpha, T)


def test_ssamd_drops_smallest_gradients_and_keeps_density():
    model = mlp(0)
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    s, T = 0.5, 30
    opt = ssam.SSAMD(
        params,
        torch.optim.SGD,
        rho=0.1,
        sparsity=s,
        drop_rate=0.5,
        update_interval=1,
        total_steps=T,
        seed=7,
        lr=0.05,
        momentum=0.9,
    )
    k = round((1 - s) * d)
    assert int(flat(opt.masks()).sum()) == k
    total_removed = 0
    for t in range(T):
        x, y = vec_batch(t)
        loss_of(model, x, y).backward()
        g = flat([p.grad for p in params]).clone()
        old = flat(opt.masks()).clone()
        steps_before = opt.steps
        opt.first_step(zero_grad=True)
        new = flat(opt.masks())
        assert int(new.sum()) == k  # exact count at every step
        if t == 0:
            assert torch.equal(old, new)  # the initial mask is used at step 0
        else:
            assert opt.last_mask_update == steps_before  # update_interval=1: a round every step
            n_drop = opt.drop_count(steps_before)
            assert n_drop == int(0.5 / 2 * (1 + math.cos(math.pi * steps_before / T)) * (1 - s) * d)
            score = torch.where(old, g.abs(), torch.tensor(math.inf))
            dropped = torch.zeros(d, dtype=torch.bool)
            dropped[torch.argsort(score)[:n_drop]] = True  # Eq. 7: n_drop smallest |g| among perturbed
            assert not (dropped & ~old).any()
            kept = old & ~dropped
            removed = old & ~new
            assert not (removed & ~dropped).any(), (
                "removed an entry that is not among the n_drop smallest |g|"
            )
            assert not (kept & ~new).any(), "lost an entry that should have been kept"
            assert int(removed.sum()) <= n_drop
            assert int((new & ~old).sum()) == int(removed.sum())
            total_removed += int(removed.sum())
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
    assert total_removed > 0.3 * sum(opt.drop_count(t) for t in range(1, T))  # masks really move
    assert opt.density() == k / d


def test_ssamd_growth_is_random_and_seeded():
    """Eq. 8: growth picks at random among the entries not kept, from the optimizer's seeded generator."""
    model = mlp(0)
    params = list(model.parameters())
    x, y = vec_batch(0)
    loss_of(model, x, y).backward()
    grads = [p.grad.clone() for p in params]
    start = [
        m.clone()
        for m in ssam.SSAMD(params, torch.optim.SGD, sparsity=0.5, total_steps=10, seed=0, lr=0.1).masks()
    ]

    def one_round(seed):
        opt = ssam.SSAMD(
            params, torch.optim.SGD, sparsity=0.5, drop_rate=0.5, total_steps=10, seed=seed, lr=0.1
        )
        for p, m in zip(params, start):
            opt.state[p]["mask"] = m.clone()
        opt.drop_and_grow(grads)
        return flat(opt.masks()), opt.drop_count(0)

    old = flat(start)
    picks = []
    for seed in range(30):
        new, n_drop = one_round(seed)
        assert int(new.sum()) == int(old.sum()) and n_drop > 0
        picks.append(new)
    assert torch.equal(one_round(5)[0], picks[5])  # same seed, same growth
    picks = torch.stack(picks)
    always = picks.all(0)  # the kept entries (same grads, same old mask)
    assert int(always.sum()) == int(old.sum()) - n_drop
    candidates = ~always
    freq = picks[:, candidates].float().mean(0)
    assert len({tuple(p.nonzero().flatten().tolist()) for p in picks}) == 30  # every seed grows differently
    assert float((freq > 0).float().mean()) > 0.95  # growth reaches (almost) every candidate
    assert float(freq.max()) < 0.9  # and favours none


# ----------------------------------------------------------------------------------------------------
# 6. N:M masks and the sparse backward


def check_24(params, masks):
    pooled_on = pooled_n = 0
    eligible = 0
    for p, m in zip(params, masks):
        assert m.dtype == torch.bool and m.shape == p.shape
        if p.dim() >= 2 and p.shape[0] % 4 == 0:
            eligible += 1
            rows = m.reshape(p.shape[0], -1)  # [out, in*k*k]; a group: 4 consecutive outputs
            assert (rows.reshape(p.shape[0] // 4, 4, -1).sum(1) == 2).all()
        else:
            pooled_on += int(m.sum())
            pooled_n += m.numel()
    assert eligible >= 2 and pooled_n > 0
    assert pooled_on == round(0.5 * pooled_n)


def test_nm_mask_on_hand_made_tensors():
    score = torch.tensor(
        [
            [9.0, 0.0, 5.0],
            [1.0, 8.0, 6.0],
            [7.0, 2.0, 4.0],
            [3.0, 7.0, 8.0],
            [0.0, 1.0, 2.0],
            [5.0, 9.0, 3.0],
            [6.0, 3.0, 1.0],
            [2.0, 4.0, 0.0],
        ]
    )
    expected = torch.tensor(
        [[1, 0, 0], [0, 1, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 1], [1, 0, 0], [0, 1, 0]],
        dtype=torch.bool,
    )
    assert torch.equal(ssam.nm_mask(score, 2, 4), expected)
    # 4-D conv weight [out, in, kh, kw]: groups of 4 consecutive outputs at every (in, kh, kw)
    g = torch.Generator().manual_seed(0)
    score = torch.randperm(8 * 2 * 3 * 3, generator=g).float().reshape(8, 2, 3, 3)
    got = ssam.nm_mask(score, 2, 4)
    assert got.shape == score.shape and got.dtype == torch.bool
    for i in range(2):
        for a in range(3):
            for b in range(3):
                for grp in range(2):
                    col = score[grp * 4 : (grp + 1) * 4, i, a, b]
                    want = torch.zeros(4, dtype=torch.bool)
                    want[sorted(range(4), key=lambda j: -float(col[j]))[:2]] = True
                    assert torch.equal(got[grp * 4 : (grp + 1) * 4, i, a, b], want)
    assert torch.equal(
        ssam.nm_mask(score, 1, 4).reshape(2, 4, -1).sum(1), torch.ones(2, 18, dtype=torch.long)
    )


def test_ssamf_24_masks():
    model = nm_net(0).double()
    data = [img_batch(30, 8, torch.float64)]
    opt = ssam.SSAMF(
        model.parameters(), torch.optim.SGD, sparsity=0.5, structure="2:4", num_samples=8, lr=0.1
    )
    opt.update_mask(model, data)
    params = list(model.parameters())
    check_24(params, opt.masks())
    fisher = ssam.empirical_fisher(model, data, 8)
    for p, m in zip(params, opt.masks()):  # in each group, the 2 kept have the highest Fisher
        if p.dim() >= 2 and p.shape[0] % 4 == 0:
            f = fisher[p].reshape(p.shape[0] // 4, 4, -1)
            mm = m.reshape(p.shape[0] // 4, 4, -1)
            kept_min = torch.where(mm, f, math.inf).amin(1)
            drop_max = torch.where(~mm, f, -math.inf).amax(1)
            assert (kept_min >= drop_max).all()
    pooled = [p for p in params if not (p.dim() >= 2 and p.shape[0] % 4 == 0)]
    fp = flat([fisher[p] for p in pooled])
    mp = flat([opt.state[p]["mask"] for p in pooled])
    assert fp[mp].min() >= fp[~mp].max()  # global top-k among the ineligible
    sam_step(model, opt, *img_batch(0, dtype=torch.float64))
    check_24(params, opt.masks())


def test_ssamd_24_masks_initially_and_after_updates():
    model = nm_net(0)
    params = list(model.parameters())
    opt = ssam.SSAMD(
        params,
        torch.optim.SGD,
        sparsity=0.5,
        structure="2:4",
        update_interval=1,
        total_steps=20,
        drop_rate=0.8,
        seed=1,
        lr=0.05,
        momentum=0.9,
    )
    check_24(params, opt.masks())
    first = flat(opt.masks()).clone()
    for t in range(6):
        sam_step(model, opt, *img_batch(t))
        check_24(params, opt.masks())
    assert opt.last_mask_update == 5
    assert not torch.equal(first, flat(opt.masks()))


def test_sparse_input_grad_is_masked_matmul():
    """dX[b, i] = sum over the kept outputs o of dY[b, o] W[o, i], written as loops over the mask's True
    entries."""
    g = torch.Generator().manual_seed(0)
    gy, w = (
        torch.randn(5, 8, generator=g, dtype=torch.float64),
        torch.randn(8, 12, generator=g, dtype=torch.float64),
    )
    mask = ssam.nm_mask(torch.rand(8, 12, generator=g), 2, 4)
    expected = torch.zeros(5, 12, dtype=torch.float64)
    for o, i in mask.nonzero().tolist():
        for b in range(5):
            expected[b, i] += gy[b, o] * w[o, i]
    torch.testing.assert_close(ssam.sparse_input_grad(gy, w, mask), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ssam.sparse_input_grad(gy, w, mask), gy @ w)


def test_sparse_ascent_masks_input_grads_of_linear_layers_only_inside():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.Linear(4, 6)
    )  # last: out 6, not 2:4
    opt = ssam.SSAMD(
        model.parameters(), torch.optim.SGD, sparsity=0.5, structure="2:4", total_steps=10, seed=0, lr=0.1
    )
    l1, l2, l3 = model[0], model[2], model[3]
    m1, m2 = opt.state[l1.weight]["mask"], opt.state[l2.weight]["mask"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 6, generator=g)  # 3-D input: the reshape path
    c = torch.randn(3, 5, 6, generator=g)  # dLoss/dOutput

    def forward_backward():
        xx = x.clone().requires_grad_(True)
        for p in model.parameters():
            p.grad = None
        out = model(xx)
        (out * c).sum().backward()
        return out.detach(), xx.grad

    with ssam.sparse_ascent(model, opt) as patched:
        assert {id(m) for m in patched} == {id(l1), id(l2)}
        out, gx = forward_backward()
    # by hand: forward dense; backward dX through W ⊙ M for the 2:4 layers, dense W for the ineligible one
    with torch.no_grad():
        h1 = x @ l1.weight.T + l1.bias
        a1 = torch.tanh(h1)
        h2 = a1 @ l2.weight.T + l2.bias
        h3 = h2 @ l3.weight.T + l3.bias
        d3 = c
        d2 = d3 @ l3.weight  # dense: layer 3 is not patched
        da1 = d2 @ (l2.weight * m2)
        dh1 = da1 * (1 - a1**2)
        dx = dh1 @ (l1.weight * m1)

        def fl(t):
            return t.reshape(-1, t.shape[-1])

    torch.testing.assert_close(out, h3, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, dx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l3.weight.grad, fl(d3).T @ fl(h2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l2.weight.grad, fl(d2).T @ fl(a1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l2.bias.grad, fl(d2).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1.weight.grad, fl(dh1).T @ fl(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1.bias.grad, fl(dh1).sum(0), rtol=1e-5, atol=1e-6)

    # after the context: plain nn.Linear again, dense backward
    assert all("forward" not in vars(m) for m in model.modules())
    out, gx = forward_backward()
    with torch.no_grad():
        dense_dx = (((c @ l3.weight) @ l2.weight) * (1 - a1**2)) @ l1.weight
    torch.testing.assert_close(
        out,
        F.linear(
            F.linear(torch.tanh(F.linear(x, l1.weight, l1.bias)), l2.weight, l2.bias), l3.weight, l3.bias
        ),
        rtol=1e-6,
        atol=1e-6,
    )
    torch.testing.assert_close(gx, dense_dx, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(gx, dx, atol=1e-4)  # the masked and dense input grads differ

    with pytest.raises(RuntimeError, match="boom"):  # restored on an exception too
        with ssam.sparse_ascent(model, opt):
            raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in model.modules())
    with pytest.raises(ValueError, match="N:M"):
        with ssam.sparse_ascent(model, ssam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)):
            pass


# ----------------------------------------------------------------------------------------------------
# 7. state_dict round trip: a resumed run equals a run straight through, bit for bit


def build(kind, seed):
    model = convbn(seed)
    kw = dict(rho=0.2, lr=0.05, momentum=0.9, weight_decay=1e-3)
    if kind == "sam":
        opt = ssam.SAM(model.parameters(), torch.optim.SGD, **kw)
    elif kind == "ssamf":
        opt = ssam.SSAMF(
            model.parameters(), torch.optim.SGD, sparsity=0.7, num_samples=8, update_interval=2, **kw
        )
    else:
        opt = ssam.SSAMD(
            model.parameters(),
            torch.optim.SGD,
            sparsity=0.7,
            update_interval=1,
            total_steps=12,
            drop_rate=0.6,
            seed=seed + 100,
            **kw,
        )
    return model, opt


def train(kind, model, opt, start, stop):
    for t in range(start, stop):
        x, y = img_batch(t)
        if kind == "ssamf" and opt.mask_update_due:
            opt.update_mask(model, [img_batch(1000 + t, 8)])
        sam_step(model, opt, x, y)


@pytest.mark.parametrize("kind", ["sam", "ssamf", "ssamd"])
def test_resume_equals_straight_run(kind):
    N, k = 7, 3
    a, oa = build(kind, 0)
    train(kind, a, oa, 0, N)

    b, ob = build(kind, 0)
    train(kind, b, ob, 0, k)
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": ob.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    c, oc = build(kind, 1)  # different init, different mask seed
    c.load_state_dict(ckpt["model"])
    oc.load_state_dict(ckpt["opt"])
    assert oc.param_groups is oc.base_optimizer.param_groups
    assert oc.steps == k
    train(kind, c, oc, k, N)

    assert_bitwise(snapshot(a), snapshot(c))  # parameters and BN buffers
    assert oa.steps == oc.steps == N
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(
            oa.base_optimizer.state[p]["momentum_buffer"], oc.base_optimizer.state[q]["momentum_buffer"]
        )
    if kind != "sam":
        assert oa.last_mask_update == oc.last_mask_update
        for ma, mc in zip(oa.masks(), oc.masks()):
            assert torch.equal(ma, mc)
    if kind == "ssamd":
        assert torch.equal(oa.generator.get_state(), oc.generator.get_state())


@pytest.mark.parametrize("kind", ["ssamf", "ssamd"])
def test_masks_stay_bool_after_load_state_dict(kind):
    b, ob = build(kind, 0)
    train(kind, b, ob, 0, 2)
    c, oc = build(kind, 1)
    oc.load_state_dict(ob.state_dict())
    for p, m in zip(c.parameters(), oc.masks()):
        assert m.dtype == torch.bool, f"mask loaded as {m.dtype}"
        assert m.shape == p.shape
    assert oc.density() == ob.density()


def assert_sgd_step_with_lr(model, opt, x, y, lr):
    """One SAM step without momentum moves w by exactly -lr times the gradient taken at w + eps."""
    w = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    g2 = [p.grad.clone() for p in model.parameters()]
    opt.second_step(zero_grad=True)
    for p, w0, g in zip(model.parameters(), w, g2):
        torch.testing.assert_close(p.detach(), w0 - lr * g, rtol=0, atol=1e-7)


def test_lr_scheduler_drives_the_base_optimizer():
    model = mlp(0)
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
        sched.step()
    lr = 0.2 * (1 + math.cos(math.pi / 4)) / 2
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    x, y = vec_batch(0)
    assert_sgd_step_with_lr(model, opt, x, y, lr)

    # after load_state_dict the scheduler still drives the lr the base optimizer uses
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is opt.base_optimizer.param_groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched.step()
    lr2 = 0.2 * (1 + math.cos(2 * math.pi / 4)) / 2
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(lr2)
    assert_sgd_step_with_lr(model, opt, x, y, lr2)


# ----------------------------------------------------------------------------------------------------
# 8. bad input -> ValueError naming the bad value


def v(name, value):
    return re.escape(name) + ".*" + re.escape(repr(value))


def test_constructor_errors_name_the_bad_value():

    def ps():
        return mlp(0).parameters()

    SGD = torch.optim.SGD
    cases = [
        (lambda: ssam.SAM(ps(), SGD, rho=-0.1, lr=0.1), v("rho", -0.1)),
        (lambda: ssam.SSAMF(ps(), SGD, rho=-1.0, lr=0.1), v("rho", -1.0)),
        (lambda: ssam.SAM(ps(), SGD, rho=math.nan, lr=0.1), v("rho", math.nan)),
        (lambda: ssam.SSAMF(ps(), SGD, sparsity=1.5, lr=0.1), v("sparsity", 1.5)),
        (lambda: ssam.SSAMD(ps(), SGD, sparsity=-0.2, total_steps=10, lr=0.1), v("sparsity", -0.2)),
        (lambda: ssam.SSAMF(ps(), SGD, update_interval=0, lr=0.1), v("update_interval", 0)),
        (
            lambda: ssam.SSAMD(ps(), SGD, update_interval=2.5, total_steps=10, lr=0.1),
            v("update_interval", 2.5),
        ),
        (lambda: ssam.SSAMF(ps(), SGD, sparsity=0.0, structure="5:4", lr=0.1), v("structure", "5:4")),
        (lambda: ssam.SSAMD(ps(), SGD, structure="foo", total_steps=10, lr=0.1), v("structure", "foo")),
        (lambda: ssam.SSAMF(ps(), SGD, sparsity=0.9, structure="2:4", lr=0.1), v("sparsity", 0.9)),
        (lambda: ssam.SSAMF(ps(), SGD, num_samples=0, lr=0.1), v("num_samples", 0)),
        (lambda: ssam.SSAMD(ps(), SGD, drop_rate=1.5, total_steps=10, lr=0.1), v("drop_rate", 1.5)),
        (lambda: ssam.SSAMD(ps(), SGD, lr=0.1), v("total_steps", None)),
        (lambda: ssam.SAM(ps(), "sgd", lr=0.1), v("base_optimizer", "sgd")),
        (lambda: ssam.SAM(ps(), nn.Linear, lr=0.1), v("base_optimizer", nn.Linear)),
    ]
    for make, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            make()


def test_state_errors():
    model = mlp(0)
    x, y = vec_batch(0)
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="second_step"):
        opt.second_step()
    assert opt.steps == 0
    assert_bitwise([p.detach() for p in model.parameters()], w)
    loss_of(model, x, y).backward()
    opt.first_step()
    perturbed = [p.detach().clone() for p in model.parameters()]
    eps = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="first_step"):
        opt.first_step()
    assert_bitwise([p.detach() for p in model.parameters()], perturbed)  # not perturbed twice
    assert_bitwise([p.grad for p in model.parameters()], eps)
    with pytest.raises(ValueError, match="perturbed"):
        opt.state_dict()
    opt.restore()
    assert_bitwise([p.detach() for p in model.parameters()], w)
    opt.state_dict()  # fine once restored


def test_ssamf_step_without_mask_raises_and_changes_nothing():
    model = mlp(0)
    opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, lr=0.1)
    assert opt.mask_update_due
    x, y = vec_batch(0)
    loss_of(model, x, y).backward()
    w = [p.detach().clone() for p in model.parameters()]
    g = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="update_mask"):
        opt.first_step(zero_grad=True)
    assert_bitwise([p.detach() for p in model.parameters()], w)
    assert_bitwise([p.grad for p in model.parameters()], g)
    assert opt.steps == 0
    opt.update_mask(model, [(x, y)] * 10)  # then it works
    opt.first_step(zero_grad=True)
    opt.restore()


def test_fisher_with_too_few_samples_raises():
    model = mlp(0)
    x, y = vec_batch(0, 5)
    with pytest.raises(ValueError, match=r"5\b.*\b10\b|10\b.*\b5\b"):
        ssam.empirical_fisher(model, [(x, y)], 10)
    opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, num_samples=10, lr=0.1)
    with pytest.raises(ValueError, match="10"):
        opt.update_mask(model, [(x, y)])
    assert opt.last_mask_update == -1


# ----------------------------------------------------------------------------------------------------
# 9. non-finite first-pass gradients; a closure that raises


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("kind", ["sam", "ssamd"])
def test_nonfinite_gradient_gives_no_perturbation(kind, bad):
    model = mlp(0)
    opt = make_opt(kind, model.parameters())
    twin = copy.deepcopy(model)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    x, y = vec_batch(0)
    w = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    with torch.no_grad():
        list(model.parameters())[2].grad[1, 3] = bad
    opt.first_step(zero_grad=True)
    assert_bitwise([p.detach() for p in model.parameters()], w)
    loss_of(model, x, y).backward()
    g2 = [p.grad.clone() for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in g2)
    opt.second_step(zero_grad=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for q, g in zip(twin.parameters(), g2):
        q.grad = g
    sgd.step()
    assert_bitwise([p.detach() for p in model.parameters()], [q.detach() for q in twin.parameters()])


def test_step_closure_raising_restores_weights():
    model = convbn(0)
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    x, y = img_batch(0)
    w = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            assert any(not torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))  # perturbed now
            raise RuntimeError("second pass blew up")
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="second pass blew up"):
        opt.step(closure, both_passes=True)
    assert_bitwise([p.detach() for p in model.parameters()], w)
    assert opt.steps == 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    calls.append(1)  # third call onward: normal
    loss = opt.step(closure, both_passes=True)  # usable again
    assert torch.is_tensor(loss) and opt.steps == 1


def test_step_closure_equals_manual_passes():
    """step(closure, both_passes=True) against the reference SAM step written in this file (Eq. 2 + SGD with
    momentum), and the loss it returns is the loss at w."""
    a, ref = mlp(0, torch.float64), mlp(0, torch.float64)
    oa = ssam.SAM(a.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    rsgd = RefSGD(list(ref.parameters()), lr=0.1, momentum=0.9, weight_decay=0.0)
    for t in range(3):
        x, y = vec_batch(t, dtype=torch.float64)

        def closure():
            loss = loss_of(a, x, y)
            loss.backward()
            return loss

        loss = oa.step(closure, both_passes=True)
        oa.zero_grad()
        with torch.no_grad():
            expected = loss_of(ref, x, y)
        ref_sam_step(ref, rsgd, x, y, rho=0.2)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)
    for p, q in zip(a.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
    assert (
        max(
            float((p - q).detach().abs().max())
            for p, q in zip(a.parameters(), mlp(0, torch.float64).parameters())
        )
        > 1e-2
    )


# ----------------------------------------------------------------------------------------------------
# 10. frozen_bn_stats


def test_frozen_bn_stats():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(36, 6),
        nn.BatchNorm1d(6),
        nn.BatchNorm1d(6, momentum=None),
        nn.BatchNorm1d(6, track_running_stats=False),
        nn.BatchNorm1d(6),
    )
    model[7].eval()
    x = torch.randn(8, 3, 5, 5)
    model(x)  # non-trivial running stats
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    flags = [m.track_running_stats for m in bns]
    x2 = torch.randn(8, 3, 5, 5)
    normal = copy.deepcopy(model)(x2)  # train-mode output with batch statistics
    buffers = snapshot(model)
    with ssam.frozen_bn_stats(model):
        out = model(x2)
        out.sum().backward()
        assert [m.track_running_stats for m in bns] == [
            False,
            False,
            False,
            False,
            True,
        ]  # eval BN left alone
    torch.testing.assert_close(out, normal, rtol=0, atol=0)
    assert_bitwise(snapshot(model), buffers)  # running_mean, running_var, num_batches_tracked
    assert [m.track_running_stats for m in bns] == flags == [True, True, True, False, True]
    assert [m.training for m in bns] == [True, True, True, True, False]
    model(x2)  # stats update again afterwards
    after = snapshot(model)
    changed = [not torch.equal(a, b) for a, b in zip(after, buffers)]
    names = list(model.state_dict())
    for n, ch in zip(names, changed):
        if "running" in n or "num_batches" in n:
            assert ch == (n.split(".")[0] in ("1", "4", "5")), n
    with pytest.raises(KeyError):
        with ssam.frozen_bn_stats(model):
            assert [m.track_running_stats for m in bns] == [False, False, False, False, True]
            raise KeyError("inside")
    assert [m.track_running_stats for m in bns] == flags


# ----------------------------------------------------------------------------------------------------
# 11. base optimizer instance


def test_base_optimizer_instance():
    a, b = convbn(0), convbn(0)
    oa = ssam.SSAMD(
        a.parameters(),
        torch.optim.SGD,
        rho=0.2,
        sparsity=0.5,
        update_interval=1,
        total_steps=5,
        seed=2,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
    )
    base = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ob = ssam.SSAMD(b.parameters(), base, rho=0.2, sparsity=0.5, update_interval=1, total_steps=5, seed=2)
    assert ob.base_optimizer is base and ob.param_groups is base.param_groups
    for t in range(3):
        sam_step(a, oa, *img_batch(t))
        sam_step(b, ob, *img_batch(t))
    assert_bitwise(snapshot(a), snapshot(b))
    other = mlp(0)
    with pytest.raises(ValueError, match="other parameters"):
        ssam.SAM(mlp(1).parameters(), torch.optim.SGD(other.parameters(), lr=0.1))
    part = mlp(0)
    with pytest.raises(ValueError, match="other parameters"):
        ssam.SAM(part.parameters(), torch.optim.SGD(part[0].parameters(), lr=0.1))
    c = mlp(0)
    with pytest.raises(ValueError, match="lr"):
        ssam.SAM(c.parameters(), torch.optim.SGD(c.parameters(), lr=0.1), lr=0.2)


# ----------------------------------------------------------------------------------------------------
# 12. ssam.py is vendorable alone


def test_vendored_copy_trains(tmp_path):
    with open(SSAM_PY) as f:
        (tmp_path / "ssam.py").write_text(f.read())
    script = textwrap.dedent(
        """
        import torch, torch.nn as nn, torch.nn.functional as F
        import ssam
        assert ssam.__file__.startswith(%r), ssam.__file__
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 5, generator=g)
        y = (x[:, 0] + x[:, 1] > 0).long()
        for name in ("ssamd", "ssamf"):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))
            if name == "ssamd":
                opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5,
                                 update_interval=2, total_steps=30, seed=0, lr=0.2, momentum=0.9)
            else:
                opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, num_samples=16,
                                 update_interval=10, lr=0.2, momentum=0.9)
            first = F.cross_entropy(model(x), y).item()
            for t in range(30):
                if name == "ssamf" and opt.mask_update_due:
                    opt.update_mask(model, [(x, y)])
                F.cross_entropy(model(x), y).backward()
                opt.first_step(zero_grad=True)
                with ssam.frozen_bn_stats(model):
                    F.cross_entropy(model(x), y).backward()
                opt.second_step(zero_grad=True)
            last = F.cross_entropy(model(x), y).item()
            assert last < 0.7 * first, (name, first, last)
            print(name, first, last)
    """
        % str(tmp_path)
    )
    (tmp_path / "train_tiny.py").write_text(script)
    env = {k: val for k, val in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(tmp_path)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "train_tiny.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ssamd" in proc.stdout and "ssamf" in proc.stdout
    assert sorted(os.listdir(tmp_path)) in (
        ["ssam.py", "train_tiny.py"],
        ["__pycache__", "ssam.py", "train_tiny.py"],
    )


# ----------------------------------------------------------------------------------------------------
# 13. masks and density


@pytest.mark.parametrize("s", [0.0, 0.37, 0.5, 0.9, 1.0])
def test_masks_are_bool_and_density_is_exact(s):
    model = convbn(0)
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    k = round((1 - s) * d)
    od = ssam.SSAMD(params, torch.optim.SGD, sparsity=s, update_interval=1, total_steps=4, seed=0, lr=0.1)
    of = ssam.SSAMF(params, torch.optim.SGD, sparsity=s, num_samples=8, lr=0.1)
    of.update_mask(model, [img_batch(50)])
    for opt in (od, of):
        masks = opt.masks()
        assert len(masks) == len(params)
        for p, m in zip(params, masks):
            assert isinstance(m, torch.Tensor) and m.dtype == torch.bool and m.shape == p.shape
            assert m is opt.state[p]["mask"]
        assert int(flat(masks).sum()) == k
        assert opt.density() == k / d
    for t in range(2):
        sam_step(model, od, *img_batch(t))
        assert int(flat(od.masks()).sum()) == k and od.density() == k / d
        assert all(m.dtype == torch.bool for m in od.masks())


# ----------------------------------------------------------------------------------------------------
# 13. models a vendoring user brings: tied weights, BatchNorm1d, frozen parameters, davda54's loop
#     and checkpoints, autocast


class _TiedDecoder(nn.Module):
    """An encoder Linear whose weight the decoder reuses transposed, F.linear(h, enc.weight.t()), and one
    Parameter shared by two Linear modules."""

    def __init__(self):
        super().__init__()
        self.enc, self.a, self.b, self.head = (
            nn.Linear(6, 5),
            nn.Linear(6, 6),
            nn.Linear(6, 6),
            nn.Linear(6, 4),
        )
        self.b.weight = self.a.weight

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        h = torch.tanh(F.linear(h, self.enc.weight.t()))  # 5 -> 6 through the tied matrix
        return self.head(torch.tanh(self.b(torch.tanh(self.a(h)))))


def test_empirical_fisher_is_exact_with_tied_weights():
    torch.manual_seed(0)
    model = _TiedDecoder().double()
    data = [vec_batch(s, 5, torch.float64) for s in (1, 2)]
    fisher = ssam.empirical_fisher(model, data, 9)
    params = list(model.parameters())  # the shared weight once
    assert len(params) == 7 and set(map(id, fisher)) == set(map(id, params))
    for p, e in zip(params, loop_fisher(model, data, 9)):
        torch.testing.assert_close(fisher[p], e, rtol=1e-9, atol=1e-15)
    assert float(fisher[model.enc.weight].abs().min()) > 0


def test_batchnorm1d_on_vectors_uses_running_stats_for_one_sample():
    """[B, C] input has no per-sample statistics: the Fisher's batch of one uses the running statistics there
    (the layer as in eval mode), and BatchNorm2d beside it still normalizes each sample alone."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(36, 6),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Linear(6, 4),
    ).double()
    with torch.no_grad():
        model(img_batch(3, 8, torch.float64)[0])  # running stats away from 0 / 1
    model.train()
    data = [img_batch(4, 7, torch.float64)]
    state = snapshot(model)
    opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, sparsity=0.5, num_samples=7, lr=0.1)
    opt.update_mask(model, data)  # crashed inside torch before
    assert opt.density() == 0.5 and model.training
    assert_bitwise(snapshot(model), state)
    reference = copy.deepcopy(model)
    reference[5].eval()  # what the batch of one uses
    fisher = ssam.empirical_fisher(model, data, 7)
    for p, e in zip(model.parameters(), loop_fisher(reference, data, 7)):
        torch.testing.assert_close(fisher[p], e, rtol=1e-9, atol=1e-15)
    model[5] = nn.BatchNorm1d(6, track_running_stats=False).double()
    with pytest.raises(ValueError, match="track_running_stats=True"):
        ssam.empirical_fisher(model, data, 7)


@pytest.mark.parametrize("kind", ["ssamf", "ssamd", "ssamf-tensor", "samon"])
def test_frozen_parameters_get_no_mask_and_stay_unperturbed(kind):
    model = convbn(0, torch.float64)
    frozen = [model[0].weight, model[1].weight, model[1].bias]  # a conv and a BatchNorm, fine-tuning style
    for p in frozen:
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    kw = dict(rho=0.5, lr=0.1)
    if kind == "samon":
        opt = train_py.samon(model, torch.optim.SGD, **kw)
    elif kind == "ssamd":
        opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, sparsity=0.5, total_steps=10, seed=0, **kw)
    else:
        opt = ssam.SSAMF(
            model.parameters(),
            torch.optim.SGD,
            sparsity=0.5,
            num_samples=6,
            structure="tensor" if kind == "ssamf-tensor" else None,
            **kw,
        )
        fisher = ssam.empirical_fisher(model, [img_batch(5, 6, torch.float64)], 6)
        assert set(map(id, fisher)) == set(map(id, trainable))
        opt.update_mask(model, [img_batch(5, 6, torch.float64)])
    assert [id(p) for p in opt.masked] == [id(p) for p in trainable]
    assert all("mask" not in opt.state.get(p, {}) for p in frozen)
    if kind in ("ssamf", "ssamd"):
        assert opt.density() == 0.5  # exactly 1 - s over trainable entries
        assert sum(int(m.sum()) for m in opt.masks()) == sum(p.numel() for p in trainable) // 2
    if kind == "samon":
        assert all(not opt.state[p]["mask"].any() for p in trainable if p.dim() > 1)
        assert any(opt.state[p]["mask"].all() for p in trainable)  # the trainable BatchNorm
    w = [p.detach().clone() for p in frozen]
    x, y = img_batch(6, 6, torch.float64)
    with opt.ascent_pass():
        loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    assert_bitwise([p.detach() for p in frozen], w)  # never perturbed
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)
    assert_bitwise([p.detach() for p in frozen], w)
    model[0].weight.requires_grad_(True)  # unfrozen after the optimizer was built
    loss_of(model, x, y).backward()
    with pytest.raises(ValueError, match="unfreezing"):
        opt.first_step()


def _davda_closure(model, x, y, calls):
    def closure():  # davda54's README closure
        calls.append(1)
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    return closure


def davda54_sam_step(model, sgd, x, y, rho, masks=None):
    """davda54/sam's SAM as published, re-written here: the user's loss.backward() at w, then step(closure):
    grad_norm = ||g||_2 over all parameters, e_w = g * rho / (grad_norm + 1e-12) (times the SSAM mask), w +=
    e_w; the closure's forward + backward at w + e_w; w restored, base step. BatchNorm statistics follow both
    passes."""
    params = sgd.params
    loss_of(model, x, y).backward()
    with torch.no_grad():
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
        e_w = [p.grad * (rho / (norm + 1e-12)) for p in params]
        if masks is not None:
            e_w = [e * m for e, m in zip(e_w, masks)]
        old = [p.clone() for p in params]
        for p, e in zip(params, e_w):
            p.add_(e)
            p.grad = None
    loss = loss_of(model, x, y)
    loss.backward()
    with torch.no_grad():
        for p, w in zip(params, old):
            p.copy_(w)
    sgd.step([p.grad for p in params])
    for p in params:
        p.grad = None
    return loss.detach()


@pytest.mark.parametrize("kind", ["sam", "ssamd"])
def test_davda54_loop_runs_unchanged_two_passes_a_step(kind):
    """davda54's documented loop: loss.backward(); optimizer.step(closure); optimizer.zero_grad(). One closure
    call (2 forward/backward passes a step, BatchNorm statistics updated twice, as in davda54's SAM), the
    weights, BatchNorm buffers and loss of davda54's algorithm re-written in davda54_sam_step (SSAM-D: with
    the mask the optimizer used, which the other tests check)."""
    a, b = convbn(0, torch.float64), convbn(0, torch.float64)
    oa = make_opt(kind, a.parameters())
    rsgd = RefSGD(list(b.parameters()), lr=0.1, momentum=0.9, weight_decay=5e-3)
    forwards = []
    a.register_forward_hook(lambda *args: forwards.append(1))
    for t in range(3):
        x, y = img_batch(t, dtype=torch.float64)
        calls = []
        loss = loss_of(a, x, y)
        loss.backward()
        loss2 = oa.step(_davda_closure(a, x, y, calls))
        oa.zero_grad()
        assert len(calls) == 1 and len(forwards) == 2 * (t + 1)
        masks = [m.clone() for m in oa.masks()] if kind == "ssamd" else None
        expected = davda54_sam_step(b, rsgd, x, y, rho=0.2, masks=masks)
        torch.testing.assert_close(loss2.detach(), expected, rtol=1e-12, atol=0)
    for u, v in zip(snapshot(a), snapshot(b)):  # weights and BatchNorm buffers
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    assert (
        max(
            float((p - q).detach().abs().max())
            for p, q in zip(a.parameters(), convbn(0, torch.float64).parameters())
        )
        > 1e-2
    )


def test_davda54_loop_equals_the_reference_sam_step():
    model, ref = mlp(0, torch.float64), mlp(0, torch.float64)
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9, weight_decay=5e-3)
    sgd = RefSGD(list(ref.parameters()), lr=0.1, momentum=0.9, weight_decay=5e-3)
    for t in range(4):
        x, y = vec_batch(t, dtype=torch.float64)
        loss_of(model, x, y).backward()
        opt.step(_davda_closure(model, x, y, []))
        opt.zero_grad()
        ref_sam_step(ref, sgd, x, y, rho=0.2)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_step_without_a_first_backward_says_what_to_do():
    model = mlp(0)
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = vec_batch(0)
    calls = []
    with pytest.raises(ValueError, match="both_passes=True"):
        opt.step(_davda_closure(model, x, y, calls))
    assert calls == [] and opt.steps == 0
    opt.step(_davda_closure(model, x, y, calls), both_passes=True)  # the one-closure form: two calls
    assert len(calls) == 2 and opt.steps == 1


def _davda54_state_dict(model, lr):
    """What davda54's SAM.state_dict() holds: torch.optim.Optimizer's state_dict of the SGD groups plus rho
    and adaptive, and {'old_p': w} per parameter; no momentum (that lives in its base optimizer)."""
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sd = sgd.state_dict()
    for g in sd["param_groups"]:
        g.update(rho=0.3, adaptive=False)
    sd["state"] = {i: {"old_p": p.detach().clone()} for i, p in enumerate(model.parameters())}
    return sd


@pytest.mark.parametrize("kind", ["sam", "ssamd"])
def test_davda54_checkpoint_loads_with_a_warning(kind):
    model = convbn(0)
    opt = make_opt(kind, model.parameters())
    masks = [m.clone() for m in opt.masks()] if kind != "sam" else []
    with pytest.warns(UserWarning, match="no base-optimizer state"):
        opt.load_state_dict(_davda54_state_dict(model, lr=0.03))
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["lr"] == 0.03 and opt.param_groups[0]["rho"] == 0.3
    assert not opt.base_optimizer.state and all("old_p" not in s for s in opt.state.values())
    assert all(torch.equal(m, n) for m, n in zip(masks, opt.masks() if masks else []))
    sam_step(model, opt, *img_batch(0))  # trains on
    assert opt.steps == 1
    with pytest.raises(ValueError, match="param_groups"):
        opt.load_state_dict({"model": {}})


def test_sparse_ascent_under_autocast_bf16():
    """Forward under torch.autocast (bf16 on the CPU), backward outside it, as the AMP recipe does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    opt = ssam.SSAMD(
        model.parameters(), torch.optim.SGD, sparsity=0.5, structure="2:4", total_steps=10, seed=0, lr=0.1
    )
    m1, m2 = opt.state[model[0].weight]["mask"], opt.state[model[2].weight]["mask"]
    x = torch.randn(5, 6).requires_grad_(True)
    with ssam.sparse_ascent(model, opt) as patched:
        assert len(patched) == 2
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()

    def bf(t):
        return t.to(torch.bfloat16).double()

    with torch.no_grad():  # the same in float64 from bf16 operands
        a1 = torch.tanh(bf(x) @ bf(model[0].weight).T + bf(model[0].bias))
        dh = (torch.ones(5, 4, dtype=torch.float64) @ (bf(model[2].weight) * m2)) * (1 - a1**2)
        dx = dh @ (bf(model[0].weight) * m1)
    assert x.grad.dtype == torch.float32 and model[0].weight.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.double(), dx, rtol=0.05, atol=0.02)
    torch.testing.assert_close(model[0].weight.grad.double(), dh.T @ bf(x), rtol=0.05, atol=0.02)
    torch.testing.assert_close(
        model[2].weight.grad.double(), torch.ones(4, 5, dtype=torch.float64) @ a1, rtol=0.05, atol=0.02
    )


def test_nonfinite_guard_is_multi_tensor_in_every_float_dtype():
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        model = mlp(0, dtype)
        opt = ssam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
        loss_of(model, *[t.to(dtype) if t.is_floating_point() else t for t in vec_batch(0)]).backward()
        w = [p.detach().clone() for p in model.parameters()]
        list(model.parameters())[0].grad[0, 0] = math.nan
        opt.first_step()
        assert_bitwise([p.detach() for p in model.parameters()], w)
        assert all(not p.grad.any() for p in model.parameters())  # eps = +0 everywhere, no NaN left
        opt.restore()


# ----------------------------------------------------------------------------------------------------
# interrupts, sparse gradients, every norm layer with running statistics, costs, nm_mask's input


def test_keyboard_interrupt_in_pass_2_restores_w():
    """Ctrl-C in the closure's second call (at w + eps) of step(closure, both_passes=True): w bit-exact, no
    gradient left, nothing counted; the KeyboardInterrupt goes on up."""
    model = mlp(0)
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    w, calls = [p.detach().clone() for p in model.parameters()], []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure, both_passes=True)
    assert_bitwise([p.detach() for p in model.parameters()], w)
    assert opt.steps == 0 and opt._w is None
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("kind", ["sam", "ssamf", "ssamd"])
def test_sparse_gradients_refused_before_anything_changes(kind):
    """nn.Embedding(sparse=True) gives a sparse gradient: first_step (SSAM-F: update_mask) refuses it with a
    ValueError naming the parameter's shape and sparse=False; weights, gradients and counters untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 3))
    kw = dict(rho=0.1, lr=0.1)
    if kind == "sam":
        opt = ssam.SAM(model.parameters(), torch.optim.SGD, **kw)
    elif kind == "ssamf":
        opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, num_samples=2, **kw)
    else:
        opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, total_steps=5, seed=0, **kw)
    x, y = torch.randint(0, 10, (4, 3)), torch.randint(0, 3, (4,))
    w = [p.detach().clone() for p in model.parameters()]
    if kind == "ssamf":
        with pytest.raises(ValueError, match=r"\(10, 4\).*sparse=False"):
            opt.update_mask(model, [(x, y)])
        assert opt.last_mask_update == -1 and all(p.grad is None for p in model.parameters())
        return
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"\(10, 4\).*sparse=False"):
        opt.first_step()
    assert_bitwise([p.detach() for p in model.parameters()], w)
    assert all(torch.equal(p.grad.to_dense(), g.to_dense()) for p, g in zip(model.parameters(), grads))
    assert opt._w is None and opt.steps == 0


def test_frozen_bn_stats_freezes_instance_norm_statistics_too():
    """InstanceNorm(track_running_stats=True) in train mode normalizes each sample by its own statistics
    and, outside frozen_bn_stats, updates its running ones; inside, it updates nothing and gives the same
    output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    model(torch.randn(8, 3, 6, 6))  # non-trivial running statistics
    x = torch.randn(8, 3, 6, 6)
    normal = copy.deepcopy(model)(x)
    stats = [b.clone() for b in model[1].buffers()]  # running_mean, running_var, num_batches_tracked
    with ssam.frozen_bn_stats(model):
        out = model(x)
    torch.testing.assert_close(out, normal, rtol=0, atol=0)
    assert_bitwise(list(model[1].buffers()), stats)
    model(x)
    assert not torch.equal(model[1].running_mean, stats[0])  # updates again afterwards


def test_cost_tensor_masks_with_zero_costs_ranks_by_value():
    """Every cost (0, 0, 0) (no multiply-adds counted): the fills rank by value, as with equal costs,
    instead of dividing by zero."""
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(n, generator=g) + i for i, n in enumerate((20, 5, 30, 10))]
    for by_count in (False, True):
        zero = ssam.cost_tensor_masks(scores, 0.4, [(0, 0, 0)] * 4, by_count)
        ones = ssam.cost_tensor_masks(scores, 0.4, [(1, 0, 0)] * 4, by_count)
        assert [bool(m.all()) for m in zero] == [bool(m.all()) for m in ones]
        assert any(m.all() for m in zero)


def test_costs_of_another_model_are_refused():
    """costs=ascent_costs(other_model, x): none of the optimizer's parameters in it: a ValueError."""
    model, other = mlp(0), mlp(1)
    costs = ssam.ascent_costs(other, torch.randn(2, 6))
    with pytest.raises(ValueError, match="none of these parameters"):
        ssam.SSAMF(model.parameters(), torch.optim.SGD, structure="tensor", sparsity=0.2, costs=costs, lr=0.1)
    ssam.SSAMF(model.parameters(), torch.optim.SGD, structure="tensor", sparsity=0.2, lr=0.1, costs={
        p: c for p, c in zip(model.parameters(), costs.values())
    })  # fmt: skip


def test_nm_mask_refuses_a_shape_without_groups():
    """nm_mask called directly on [6, 2] scores with m=4: 6 outputs hold no groups of 4, a ValueError (the
    pooled top-k of select_masks takes such tensors)."""
    with pytest.raises(ValueError, match="m=4"):
        ssam.nm_mask(torch.arange(12.0).reshape(6, 2), 2, 4)
    keep = ssam.nm_mask(torch.arange(16.0).reshape(8, 2), 2, 4)  # outputs 2, 3 and 6, 7 of each column
    assert torch.equal(keep[:, 0], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool))
