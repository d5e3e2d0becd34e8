"""structure='tensor', norm='masked' and the SAM-ON preset: the masks that skip real work in the ascent
pass."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ssam
import train


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def sparse_step(model, opt, x, y):
    with opt.ascent_pass():
        loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    with ssam.frozen_bn_stats(model):
        loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)


def test_tensor_masks_land_as_near_the_target_as_whole_tensors_allow():
    model = tiny_net()
    for s in (0.5, 0.9, 0.99):
        opt = ssam.SSAMD(
            model.parameters(),
            torch.optim.SGD,
            sparsity=s,
            structure="tensor",
            total_steps=50,
            update_interval=1,
            lr=0.01,
        )
        x, y = batch()
        sizes = [p.numel() for p in model.parameters()]
        target = round((1 - s) * sum(sizes))
        for _ in range(6):
            sparse_step(model, opt, x, y)
            masks = opt.masks()
            on = [bool(m.all()) for m in masks]
            assert all(bool(m.all()) or not bool(m.any()) for m in masks)  # whole tensors only
            count = sum(n for n, o in zip(sizes, on) if o)
            gap_fillers = [n for n, o in zip(sizes, on) if not o and n < 2 * (target - count)]
            assert not gap_fillers, "an unperturbed tensor would bring the count nearer the target"


def test_fisher_tensor_mask_ranks_by_mean_fisher():
    model = tiny_net()
    x, y = batch()
    opt = ssam.SSAMF(
        model.parameters(), torch.optim.SGD, sparsity=0.9, num_samples=16, structure="tensor", lr=0.01
    )
    opt.update_mask(model, [(x, y)])
    fisher = ssam.empirical_fisher(model, [(x, y)], 16)
    params = list(model.parameters())
    budget = round(0.1 * sum(p.numel() for p in params))
    expected = []
    for p in sorted(params, key=lambda p: -fisher[p].mean().item()):
        if p.numel() < 2 * budget:  # nearer the budget with it
            expected.append(p)
            budget -= p.numel()
    assert {id(p) for p in params if opt.state[p]["mask"].all()} == {id(p) for p in expected}


def test_ascent_gradient_equals_full_backward_on_perturbed_and_none_elsewhere():
    model = tiny_net()
    x, y = batch()
    opt = ssam.SSAMD(
        model.parameters(), torch.optim.SGD, sparsity=0.9, structure="tensor", total_steps=10, lr=0.01
    )
    full = torch.autograd.grad(loss_of(model, x, y), list(model.parameters()))
    with opt.ascent_pass():
        loss_of(model, x, y).backward()
    for p, g in zip(model.parameters(), full):
        if opt.state[p]["mask"].all():
            torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)
        else:
            assert p.grad is None
        assert p.requires_grad  # restored after the pass


def test_requires_grad_restored_when_the_pass_raises():
    model = tiny_net()
    opt = ssam.SSAMD(
        model.parameters(), torch.optim.SGD, sparsity=0.9, structure="tensor", total_steps=10, lr=0.01
    )
    assert opt._unperturbed  # something is frozen in the pass
    with pytest.raises(RuntimeError, match="boom"):
        with opt.ascent_pass():
            assert not all(p.requires_grad for p in model.parameters())
            raise RuntimeError("boom")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_backward_does_not_descend_below_the_lowest_perturbed_layer():
    model = tiny_net()
    x, y = batch()
    opt = ssam.SSAMD(
        model.parameters(), torch.optim.SGD, sparsity=0.5, structure="tensor", total_steps=10, lr=0.01
    )
    head = {id(p) for p in model[-1].parameters()}
    opt.set_masks([torch.full_like(p, id(p) in head, dtype=torch.bool) for p in model.parameters()])
    calls = []
    model[0].register_full_backward_hook(lambda *a: calls.append("conv0"))
    model[3].register_full_backward_hook(lambda *a: calls.append("conv3"))
    with opt.ascent_pass():
        loss_of(model, x, y).backward()
    assert calls == []  # nothing below the head was differentiated
    loss_of(model, x, y).backward()
    assert calls == ["conv3", "conv0"]  # the full pass reaches them


def test_tensor_step_equals_elementwise_ssam_with_same_mask_and_masked_norm():
    x, y = batch()
    a, b = tiny_net(), tiny_net()
    kw = dict(rho=0.1, lr=0.05, momentum=0.9, weight_decay=1e-3, total_steps=100, update_interval=10_000)
    ta = ssam.SSAMD(a.parameters(), torch.optim.SGD, sparsity=0.5, structure="tensor", **kw)
    eb = ssam.SSAMD(b.parameters(), torch.optim.SGD, sparsity=0.5, norm="masked", **kw)
    eb.set_masks([m.clone() for m in ta.masks()])
    for _ in range(4):
        sparse_step(a, ta, x, y)
        sparse_step(b, eb, x, y)  # element-wise: ascent_pass is a no-op
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_masked_norm_matches_the_formula():
    model = tiny_net()
    x, y = batch()
    opt = ssam.SSAMD(
        model.parameters(), torch.optim.SGD, rho=0.2, sparsity=0.5, norm="masked", total_steps=10, lr=0.1
    )
    w = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    gm = [p.grad * opt.state[p]["mask"] for p in model.parameters()]
    norm = torch.sqrt(sum((g**2).sum() for g in gm))
    opt.first_step()
    for p, w0, g in zip(model.parameters(), w, gm):
        torch.testing.assert_close(p.detach(), w0 + 0.2 * g / (norm + 1e-12), rtol=1e-6, atol=1e-7)
    opt.restore()


def test_bad_norm_arguments():
    model = tiny_net()
    with pytest.raises(ValueError, match="norm='full'"):
        ssam.SSAMD(
            model.parameters(), torch.optim.SGD, structure="tensor", norm="full", total_steps=10, lr=0.1
        )
    with pytest.raises(ValueError, match="norm='l1'"):
        ssam.SSAMF(model.parameters(), torch.optim.SGD, norm="l1", lr=0.1)


def test_samon_perturbs_normalization_layers_chosen_by_type():
    model = tiny_net()
    model.add_module("conv_named_norm", nn.LayerNorm(10))  # a name that lies: type decides
    opt = train.samon(model, torch.optim.SGD, rho=0.5, lr=0.1)
    norm_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))
        for p in m.parameters()
    }
    for p in model.parameters():
        assert bool(opt.state[p]["mask"].all()) == (id(p) in norm_ids)
        assert bool(opt.state[p]["mask"].any()) == (id(p) in norm_ids)
    assert not opt.mask_update_due
    x, y = batch()
    w = {id(p): p.detach().clone() for p in model.parameters()}
    before = copy.deepcopy(model)
    sparse_step(model, opt, x, y)
    assert opt.steps == 1
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="no normalization layer"):
        train.samon(nn.Linear(3, 3), torch.optim.SGD, lr=0.1)
    del w


def test_tensor_state_dict_roundtrip_keeps_the_frozen_set():
    model = tiny_net()
    opt = ssam.SSAMD(
        model.parameters(), torch.optim.SGD, sparsity=0.9, structure="tensor", total_steps=10, lr=0.1
    )
    sd = opt.state_dict()
    model2 = tiny_net()
    opt2 = ssam.SSAMD(
        model2.parameters(),
        torch.optim.SGD,
        sparsity=0.9,
        structure="tensor",
        total_steps=10,
        seed=123,
        lr=0.1,
    )
    opt2.load_state_dict(sd)
    idx = {id(p): i for i, p in enumerate(model.parameters())}
    idx2 = {id(p): i for i, p in enumerate(model2.parameters())}
    assert sorted(idx[id(p)] for p in opt._unperturbed) == sorted(idx2[id(p)] for p in opt2._unperturbed)
