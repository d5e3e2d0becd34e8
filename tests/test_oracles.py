"""Independent oracles for the parts of ssam.py that a planted bug slipped past. Every expected
value comes from the paper's equations or from a small case counted by hand in the comments, never from
ssam.py.  Sparse SAM: Mi et al., NeurIPS 2022 (Eq. 5-9); ASAM as davda54/sam computes it, per parameter
group."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ssam

SGD = torch.optim.SGD


def ones(n, value=1.0):
    return torch.full((n,), float(value))


# ---- SSAM-D's drop (Eq. 7) and grow (Eq. 8) with 2:4 masks and with whole tensors --------------------------
def test_ssamd_24_drops_the_smallest_gradients_and_regrows_keeping_24():
    """W [8, 3] holds 6 groups (4 consecutive outputs at each input). Start: outputs o % 4 in {0, 1}
    perturbed. |g| is 10 at o % 4 == 0, 0.1 at o % 4 == 1, 100 on the unperturbed. N_drop (Eq. 9, t = 0, alpha
    = 0.5, s = 0.5, |w| = 24) = int(0.5 * 0.5 * 24) = 6: the six perturbed entries with |g| = 0.1 go, one per
    group, and each group regrows one entry at random among its three unperturbed ones (Eq. 8), back to 2 of
    4."""
    o = torch.arange(8)[:, None].expand(8, 3) % 4
    start = o < 2
    grad = torch.where(o == 0, 10.0, torch.where(o == 1, 0.1, 100.0))
    regrown = torch.zeros(8, 3)
    for seed in range(12):
        w = nn.Parameter(torch.zeros(8, 3))
        opt = ssam.SSAMD(
            [w], SGD, sparsity=0.5, structure="2:4", drop_rate=0.5, total_steps=10, seed=seed, lr=0.1
        )
        opt.set_masks([start.clone()])
        opt.drop_and_grow([grad])
        new = opt.masks()[0]
        assert (new.reshape(2, 4, 3).sum(1) == 2).all()  # 2:4 in every group
        assert new[o == 0].all()  # the largest |g| of each group is kept
        assert (new & (o > 0)).reshape(2, 4, 3).sum(1).eq(1).all()  # one regrown entry a group
        regrown += (new & (o > 0)).float()
    # the dropped entries (o % 4 == 1) come back only as often as the never-perturbed ones: about 1/3 each
    share = [float(regrown[o == k].mean()) / 12 for k in (1, 2, 3)]
    assert all(0.1 < s < 0.6 for s in share), share


def test_ssamd_tensor_mode_drops_the_tensors_of_lowest_mean_gradient_and_regrows_whole_tensors():
    """8 tensors of 10; tensors 0-3 perturbed (density 0.5). Mean |g|: t0 0.384 (8 entries of 0.48, 2 of 0:
    its largest entries beat t2's), t1 0.5, t2 0.45, t3 0.1; the unperturbed 5.0. N_drop = int(0.5 * 0.5 * 80)
    = 20: two tensors' worth, t0 and t3 (lowest mean |g|, Eq. 7 by tensor); then two whole tensors regrow at
    random among the six not kept (t0, t3, t4-t7), so t1 and t2 are always perturbed and t0 only sometimes."""
    grads = [torch.tensor([0.48] * 8 + [0.0] * 2), ones(10, 0.5), ones(10, 0.45), ones(10, 0.1)]
    grads += [ones(10, 5.0)] * 4
    start = [torch.full((10,), i < 4) for i in range(8)]
    chosen = torch.zeros(8)
    for seed in range(12):
        params = [nn.Parameter(torch.zeros(10)) for _ in range(8)]
        opt = ssam.SSAMD(
            params, SGD, sparsity=0.5, structure="tensor", drop_rate=0.5, total_steps=10, seed=seed, lr=0.1
        )
        opt.set_masks([m.clone() for m in start])
        opt.drop_and_grow(grads)
        masks = opt.masks()
        assert all(bool(m.all()) or not bool(m.any()) for m in masks)  # whole tensors
        on = torch.tensor([bool(m.all()) for m in masks])
        assert int(on.sum()) == 4 and on[1] and on[2], on
        chosen += on.float()
    assert 0 < chosen[0] < 12 and 0 < chosen[3] < 12, chosen  # dropped, and regrown only at random
    assert chosen[4:].sum() > 0, chosen  # the growth reaches the never-perturbed tensors


# ---- cost-aware whole-tensor masks: costs, by_count, the cut's max dX ------------------------------------
# Three tensors of 10 and ascent costs (forward, dX of the layers above, dW): tensor 0 lowest in the network.
COSTS3 = [(100, 100, 10), (100, 50, 10), (100, 0, 10)]


class _Three(nn.Module):
    """logit = x · (1.2 p0 + p1 + p2): per sample, dL/dp0 = 1.2 dL/dp1 = 1.2 dL/dp2, so the Fisher (Eq. 5) of
    p0 is 1.44 times that of p1 and p2, entry by entry."""

    def __init__(self):
        super().__init__()
        self.p = nn.ParameterList([nn.Parameter(torch.full((10,), 0.1 * i)) for i in range(3)])

    def forward(self, x):
        z = (x * (1.2 * self.p[0] + self.p[1] + self.p[2])).sum(-1)
        return torch.stack([z, -z], -1)


def test_ssamf_costs_change_the_chosen_tensor():
    """Density 1/3: a budget of 10 entries, one tensor. Mean Fisher f for p1, p2 and 1.44 f for p0. The
    paper's ranking (no costs) takes p0. With costs, score per multiply-add of each cut (lowest layer
    allowed): dX <= 0: p2, 10 f / (100 + 0 + 10) = 0.0909 f; dX <= 50: p1, 10 f / 160; dX <= 100: p0, 14.4 f /
    210 = 0.0686 f. So p2 wins: the top of the network, cheapest to differentiate."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 10, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g))]
    picks = {}
    for costs in (None, "costs"):
        model = _Three().double()
        c = costs and dict(zip(model.p, COSTS3))
        opt = ssam.SSAMF(
            model.parameters(), SGD, sparsity=2 / 3, num_samples=8, structure="tensor", costs=c, lr=0.1
        )
        opt.update_mask(model, data)
        masks = opt.masks()
        assert all(bool(m.all()) or not bool(m.any()) for m in masks)
        picks[costs] = [i for i, m in enumerate(masks) if m.all()]
    assert picks == {None: [0], "costs": [2]}


def test_ssamd_costs_choose_by_entries_per_cost_at_start_and_after_updates():
    """SSAM-D's scores are random, so its cost rule counts entries (by_count): one tensor of 10 at every cut,
    and 10 / 110 (p2, dX 0) beats 10 / 160 and 10 / 210 whatever the draws; without costs the draw decides."""
    seen = set()
    for seed in range(10):
        for costs in (None, "costs"):
            params = [nn.Parameter(torch.zeros(10)) for _ in range(3)]
            c = costs and dict(zip(params, COSTS3))
            opt = ssam.SSAMD(
                params,
                SGD,
                sparsity=2 / 3,
                structure="tensor",
                update_interval=1,
                total_steps=4,
                seed=seed,
                costs=c,
                lr=0.1,
            )
            on = [[bool(m.all()) for m in opt.masks()]]
            for t in range(2):  # two drop-and-grow rounds with random gradients
                g = torch.rand(10, generator=torch.Generator().manual_seed(t))  # the same for each tensor
                opt.drop_and_grow([g.clone() for _ in params])
                on.append([bool(m.all()) for m in opt.masks()])
            if costs:
                assert on == [[False, False, True]] * 3, (seed, on)
            else:
                seen.update(tuple(o) for o in on)
    assert len(seen) > 1  # without costs the tensor changes with the draws


def test_cost_tensor_masks_by_count_counts_entries_not_score():
    """Means 1, 1, 2; dX 0, 0, 30; dW 10; density 1/3 (one tensor of 10). Cut dX <= 0 takes tensor 0 (ranked
    before 1 on the tie): cost 100 + 0 + 10. Cut dX <= 30 takes tensor 2: cost 100 + 30 + 10. by score: 10 /
    110 = 0.091 < 20 / 140 = 0.143 -> tensor 2; by count: 10 / 110 > 10 / 140 -> tensor 0."""
    scores = [ones(10), ones(10), ones(10, 2.0)]
    costs = [(100, 0, 10), (100, 0, 10), (100, 30, 10)]
    by_score = ssam.cost_tensor_masks(scores, 1 / 3, costs)
    by_count = ssam.cost_tensor_masks(scores, 1 / 3, costs, by_count=True)
    assert [bool(m.all()) for m in by_score] == [False, False, True]
    assert [bool(m.all()) for m in by_count] == [True, False, False]


def test_cost_of_a_cut_pays_the_largest_dx_once():
    """Means 1, 2, 2; dX 0, 30, 60; dW 10; density 2/3 (two tensors of 10). The ascent pass stops at the
    lowest perturbed layer, so a fill pays max(dX) once, not the sum. Cut dX <= 30: tensors 1 and 0, (20 + 10)
    / (100 + 30 + 20) = 0.200. Cut dX <= 60: tensors 1 and 2, 40 / (100 + 60 + 20) = 0.222 (with the sum of
    dX: 40 / 210 = 0.190, and the cut at 30 would win). Cut dX <= 0: one tensor, 10 from the budget of 20: not
    near."""
    scores = [ones(10), ones(10, 2.0), ones(10, 2.0)]
    costs = [(100, 0, 10), (100, 30, 10), (100, 60, 10)]
    assert [bool(m.all()) for m in ssam.cost_tensor_masks(scores, 2 / 3, costs)] == [False, True, True]


def test_cost_tensor_masks_boundaries_by_hand():
    """Costs (100, dX, 10); tensor 0 ranked first on equal means. (a) Closer, strictly: budget 10, sizes 6 and
    8: after tensor 0, 4 are left; tensor 1 would leave -4, not closer, so it stays out (8 < 2 * 4 is false);
    with 9 it is further still. (b) Within 25% counts the boundary: budget 8; tensor 1 (10, dX 0) alone leaves
    |-2| = 8 / 4: near, and 10 / 110 beats tensor 0 (8, dX 100) at 8 / 210. (c) No fill near: the nearest
    wins, not the best score per cost. Budget 10; tensor 1 (14, dX 0) leaves -4, tensor 0 (7, dX 100) leaves 3
    (neither within 2.5): tensor 0, though 14 / 110 > 7 / 210. (d) One tensor."""

    def on(sizes, budget, dxs, means=None):
        scores = [torch.full((n,), 1.0 if means is None else means[i]) for i, n in enumerate(sizes)]
        costs = [(100, dx, 10) for dx in dxs]
        masks = ssam.cost_tensor_masks(scores, budget / sum(sizes), costs)
        return [bool(m.all()) for m in masks]

    assert on([6, 8], 10, [0, 0], means=[2.0, 1.0]) == [True, False]
    assert on([6, 9], 10, [0, 0], means=[2.0, 1.0]) == [True, False]
    assert on([8, 10], 8, [100, 0]) == [False, True]
    assert on([7, 14], 10, [100, 0]) == [True, False]
    assert on([5], 5, [0]) == [True] and on([5], 1, [0]) == [False]


def test_ascent_costs_of_a_conv_net_counted_by_hand():
    """Input [1, 2, 4, 4]. conv1 3x3 pad 1 -> [1, 3, 4, 4]: 48 outputs x (2 * 3 * 3) = 864 multiply-adds;
    BatchNorm: 48 (elementwise); conv2 3x3 stride 2 pad 1, no bias -> [1, 4, 2, 2]: 16 x (3 * 3 * 3) = 432;
    Linear 16 -> 1: 1 x 16 = 16. Forward 1360. dX paid below a layer: the layers above it. dW: the layer's
    multiply-adds split by parameter size (conv1: 54 weight + 3 bias entries)."""
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(16, 1),
    )
    c = ssam.ascent_costs(model, torch.zeros(1, 2, 4, 4))
    conv1, bn, conv2, _, lin = model
    expected = {
        conv1.weight: (1360, 48 + 432 + 16, 864 * 54 / 57),
        conv1.bias: (1360, 496, 864 * 3 / 57),
        bn.weight: (1360, 432 + 16, 24),
        bn.bias: (1360, 448, 24),
        conv2.weight: (1360, 16, 432),
        lin.weight: (1360, 0, 16 * 16 / 17),
        lin.bias: (1360, 0, 16 * 1 / 17),
    }
    assert set(c) == set(expected)
    for p, (fwd, dx, dw) in expected.items():
        assert c[p][:2] == (fwd, dx) and c[p][2] == pytest.approx(dw, rel=1e-12), (p.shape, c[p])


class _TiedAndRecurrent(nn.Module):
    """A container with a parameter of its own (scale), shared (Linear 4 -> 4) called first and last, a GRU
    (returns a tuple) between, and an unused Linear."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.shared, self.gru, self.unused = nn.Linear(4, 4), nn.GRU(4, 4), nn.Linear(4, 4)

    def forward(self, x):  # x [L=2, B=1, 4]
        h, _ = self.gru(self.shared(x * self.scale))
        return self.shared(h)


def test_ascent_costs_count_every_call_place_a_layer_at_its_first_and_skip_unused_ones():
    """The container: its output [2, 1, 4], one each = 8. shared: 2 calls x 2 x 1 x 4 outputs x 4 = 64
    multiply-adds. The GRU: its output [2, 1, 4] (the first of its tuple, not h_n [1, 1, 4]) = 8. Forward 80.
    A layer sits where its first call starts (the docstring's rule): the container first, then shared, then
    the GRU; dX pays the layers placed above. The unused Linear costs nothing and gets no entry, though its
    container has one; no hook stays on the model."""
    torch.manual_seed(0)
    model = _TiedAndRecurrent()
    c = ssam.ascent_costs(model, torch.zeros(2, 1, 4))
    gru = list(model.gru.parameters())
    assert set(c) == {model.scale, model.shared.weight, model.shared.bias, *gru}
    assert c[model.scale] == (80, 72, 8)
    assert c[model.shared.weight] == (80, 8, 64 * 16 / 20) and c[model.shared.bias] == (80, 8, 64 * 4 / 20)
    total = sum(p.numel() for p in gru)
    assert all(c[p] == (80, 0, pytest.approx(8 * p.numel() / total, rel=1e-12)) for p in gru)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---- N:M needs sparsity 1 - N/M ---------------------------------------------------------------------------
@pytest.mark.parametrize("structure,ok,bad", [("1:4", 0.75, 0.25), ("3:4", 0.25, 0.75), ("2:8", 0.75, 0.25)])
def test_nm_structure_fixes_the_sparsity_at_one_minus_n_over_m(structure, ok, bad):
    """N of every M perturbed is a density of N/M, a sparsity of 1 - N/M."""
    n, m = map(int, structure.split(":"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8))
    opt = ssam.SSAMD(
        model.parameters(), SGD, sparsity=ok, structure=structure, total_steps=10, seed=0, lr=0.1
    )
    for p, mk in zip(model.parameters(), opt.masks()):
        if p.dim() == 2:  # every group of m consecutive outputs (at each input) holds n
            assert (mk.t().reshape(p.shape[1], 8 // m, m).sum(-1) == n).all()
    with pytest.raises(ValueError, match=rf"needs sparsity={1 - n / m:g}, got {bad}"):
        ssam.SSAMF(model.parameters(), SGD, sparsity=bad, structure=structure, lr=0.1)


# ---- SAM frame: per-group adaptive (ASAM), defaults from the base optimizer ------------------------------
def test_adaptive_is_read_per_param_group():
    """davda54's ASAM, group by group: ||g||_T = || concat(|w| g for adaptive groups, g for the others) ||,
    eps = rho * (w^2 if adaptive else 1) * g / (||g||_T + 1e-12)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    groups = [
        {"params": list(model[0].parameters()), "adaptive": True},
        {"params": list(model[2].parameters())},
    ]
    opt = ssam.SAM(groups, SGD, rho=0.3, adaptive=False, lr=0.1)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    F.cross_entropy(model(x), y).backward()
    w = [p.detach().clone() for p in model.parameters()]
    g = [p.grad.clone() for p in model.parameters()]
    ada = [True, True, False, False]
    norm = math.sqrt(sum(float(((wi.abs() if a else 1) * gi).pow(2).sum()) for wi, gi, a in zip(w, g, ada)))
    opt.first_step()
    for p, wi, gi, a in zip(model.parameters(), w, g, ada):
        eps = 0.3 * (wi * wi if a else 1) * gi / (norm + 1e-12)
        torch.testing.assert_close(p.detach() - wi, eps, rtol=1e-9, atol=1e-15)
    opt.restore()


def test_added_param_group_takes_the_base_optimizers_defaults():
    """opt.add_param_group({'params': [q]}) fills lr, momentum, ... from the base optimizer's defaults (as
    torch.optim does) and rho from SAM's: q then trains like the others. By hand, one step with momentum 0 and
    a quadratic loss: L = sum(q^2) / 2 + sum(w^2) / 2, g = q at q, eps = rho * q / ||(q, w)||, the descent
    uses the gradient at q + eps."""
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    q = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = ssam.SAM([w], SGD, rho=0.5, lr=0.1, momentum=0.0)
    opt.add_param_group({"params": [q]})
    assert opt.param_groups[1]["lr"] == 0.1 and opt.param_groups[1]["rho"] == 0.5
    assert opt.base_optimizer.param_groups is opt.param_groups and len(opt.base_optimizer.param_groups) == 2

    def closure():
        loss = (q * q).sum() / 2 + (w * w).sum() / 2
        loss.backward()
        return loss

    opt.step(closure, both_passes=True)
    norm = math.sqrt(1 + 4 + 9 + 16)
    for p, p0 in ((q, [1.0, 2.0]), (w, [3.0, 4.0])):
        p0 = torch.tensor(p0, dtype=torch.float64)
        torch.testing.assert_close(
            p.detach(), p0 - 0.1 * (p0 + 0.5 * p0 / (norm + 1e-12)), rtol=1e-12, atol=0
        )


# ---- the Fisher with a parameter the forward pass does not use ---------------------------------------------
class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.spare = nn.Parameter(torch.ones(4))  # trainable, never used in forward

    def forward(self, x):
        return self.lin(x)


def test_empirical_fisher_gives_zero_for_an_unused_parameter():
    """Softmax regression: sample i's gradient is (p_i - e_yi) x_i^T for W and p_i - e_yi for b (closed form),
    and 0 for a parameter the forward pass leaves out; SSAM-F then ranks it last."""
    torch.manual_seed(0)
    model = _Unused().double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    with torch.no_grad():
        r = torch.softmax(model(x), -1) - F.one_hot(y, 3).double()
    fisher = ssam.empirical_fisher(model, [(x, y)], 8)
    torch.testing.assert_close(
        fisher[model.lin.weight], torch.einsum("io,ij->oj", r**2, x**2), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(fisher[model.lin.bias], (r**2).sum(0), rtol=1e-12, atol=0)
    assert torch.equal(fisher[model.spare], torch.zeros(4, dtype=torch.float64))
    opt = ssam.SSAMF(model.parameters(), SGD, sparsity=0.5, num_samples=8, lr=0.1)  # 11 of 22 entries...
    opt.update_mask(model, [(x, y)])
    assert not opt.state[model.spare]["mask"].any()  # ...none of them unused


class _Norms(nn.Module):
    """BatchNorm layers a batch of one meets differently: 1 channel with eps 0.1 on [B, 1, 3, 3]; BatchNorm1d
    (eps 0.1) on [B, 2, 2] sequences (2 values a channel: its own statistics) and on [B, 2] vectors (running
    statistics: a sample alone has none)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn2 = nn.Conv2d(1, 1, 2), nn.BatchNorm2d(1, eps=0.1)
        self.seq, self.bn_seq = nn.Linear(2, 2), nn.BatchNorm1d(2, eps=0.1)
        self.vec, self.bn_vec = nn.Linear(2, 2), nn.BatchNorm1d(2, eps=0.1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):  # x [B, 1, 3, 3]
        h = torch.tanh(self.bn2(self.conv(x)))  # [B, 1, 2, 2]
        h = torch.tanh(self.bn_seq(self.seq(h.reshape(-1, 2, 2))))  # [B, 2 channels, 2 positions]
        h = torch.tanh(self.bn_vec(self.vec(h.mean(-1))))  # [B, 2]
        return self.head(h)


def test_empirical_fisher_normalizes_each_sample_as_a_batch_of_one():
    """The authors' loop (Eq. 5): each sample alone through the model in train mode; a [1, C] BatchNorm input
    has no statistics of its own, so that layer uses its running ones (eval mode) in the reference."""
    torch.manual_seed(0)
    model = _Norms().double()
    with torch.no_grad():
        model(torch.randn(16, 1, 3, 3, dtype=torch.float64))  # running statistics away from 0 / 1
    x, y = torch.randn(5, 1, 3, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    fisher = ssam.empirical_fisher(model, [(x, y)], 5)
    ref = copy.deepcopy(model)
    ref.bn_vec.eval()
    params = list(ref.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for i in range(5):
        g = torch.autograd.grad(F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]), params)
        expected = [e + gi * gi for e, gi in zip(expected, g)]
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(fisher[p], e, rtol=1e-9, atol=1e-15)
    assert all(float(e.abs().max()) > 0 for e in expected)


def test_empirical_fisher_of_a_one_parameter_model():
    """Softmax regression without a bias: (p_i - e_yi)^2 x_i^2 summed over the samples (closed form)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        r = torch.softmax(model(x), -1) - F.one_hot(y, 3).double()
    fisher = ssam.empirical_fisher(model, [(x[:4], y[:4]), (x[4:], y[4:])], 6)
    torch.testing.assert_close(
        fisher[model.weight], torch.einsum("io,ij->oj", r**2, x**2), rtol=1e-12, atol=0
    )


def test_ssamf_update_mask_uses_the_loss_it_is_given():
    """loss_fn = the first logit: its per-sample gradient is x_i for row 0 of W and 1 for b_0, 0 elsewhere
    (closed form), so the Fisher is sum_i x_i^2 on row 0, N on b_0, and the top 4 of 15 entries are b_0 (5)
    and row 0's three largest sum_i x_i^2; cross-entropy would spread them over every row."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    opt = ssam.SSAMF(model.parameters(), SGD, sparsity=11 / 15, num_samples=5, lr=0.1)
    opt.update_mask(model, [(x, y)], loss_fn=lambda out, target: out[:, 0].sum())
    row0 = (x**2).sum(0)
    expected_w = torch.zeros(3, 4, dtype=torch.bool)
    expected_w[0, row0.topk(3).indices] = True
    assert torch.equal(opt.state[model.weight]["mask"], expected_w)
    assert torch.equal(opt.state[model.bias]["mask"], torch.tensor([True, False, False]))


# ---- the documented defaults and the edges of the allowed ranges ------------------------------------------
def test_defaults_and_range_edges():
    """Defaults: rho 0.05, sparsity 0.5, num_samples 128, update_interval 1000, drop_rate 0.5. Allowed at the
    edge: num_samples 1, total_steps 1, drop_rate 0 (then nothing is ever dropped)."""
    params = [nn.Parameter(torch.zeros(4, 4))]
    assert ssam.SAM(params, SGD, lr=0.1).param_groups[0]["rho"] == 0.05
    assert ssam.SAM(params, SGD, rho=0.0, lr=0.1).param_groups[0]["rho"] == 0.0  # rho 0: the base optimizer
    f = ssam.SSAMF(params, SGD, lr=0.1)
    d = ssam.SSAMD(params, SGD, total_steps=10, seed=0, lr=0.1)
    assert [g["rho"] for g in f.param_groups + d.param_groups] == [0.05, 0.05]
    assert (f.sparsity, f.num_samples, f.update_interval) == (0.5, 128, 1000)
    assert (d.sparsity, d.drop_rate, d.update_interval) == (0.5, 0.5, 1000)
    assert f.structure is None and f.norm == "full"  # kept as given; norm None: the paper's, Eq. 2
    t = ssam.SSAMD(params, SGD, total_steps=10, seed=0, lr=0.1, structure="2:4", norm="masked")
    assert (t.structure, t.norm, t.nm) == ("2:4", "masked", (2, 4))
    assert ssam.SSAMF(params, SGD, num_samples=1, lr=0.1).num_samples == 1
    one = ssam.SSAMD(params, SGD, total_steps=1, drop_rate=0.0, seed=0, lr=0.1)
    start = one.masks()[0].clone()
    one.drop_and_grow([torch.randn(4, 4)])
    assert one.drop_count(0) == 0 and torch.equal(one.masks()[0], start)
    for structure, sparsity in (("unstructured", 0.5), ("4:4", 0.0)):  # 4:4: every entry, like sparsity 0
        opt = ssam.SSAMD(params, SGD, structure=structure, sparsity=sparsity, total_steps=5, seed=0, lr=0.1)
        assert int(opt.masks()[0].sum()) == 16 * (1 - sparsity)
    with pytest.raises(
        ValueError, match="every parameter has requires_grad=False: there is nothing to train"
    ):
        ssam.SSAMF([nn.Parameter(torch.zeros(3), requires_grad=False)], SGD, lr=0.1)


def test_ssamd_seed_none_draws_a_62_bit_seed_from_torch():
    """seed=None: the seed comes from torch's global generator (torch.manual_seed makes it reproducible) and
    spans 62 bits (a draw below 2^32 has odds 2^-30)."""
    params = [nn.Parameter(torch.zeros(3))]
    seeds = []
    for s in (0, 0, 1):
        torch.manual_seed(s)
        seeds.append(ssam.SSAMD(params, SGD, total_steps=5, lr=0.1).generator.initial_seed())
    assert seeds[0] == seeds[1] != seeds[2] and all(2**32 <= s < 2**62 for s in seeds)


def test_ssamd_tensor_mode_draws_once_per_tensor():
    """structure='tensor' draws one number per tensor (the mask is whole tensors), element-wise one per entry:
    after the initial mask the optimizer's generator has advanced by 3 or by 3 x 5 draws."""
    for structure, draws in (("tensor", 3), (None, 15)):
        params = [nn.Parameter(torch.zeros(5)) for _ in range(3)]
        opt = ssam.SSAMD(params, SGD, structure=structure, total_steps=5, seed=7, lr=0.1)
        g = torch.Generator().manual_seed(7)
        torch.rand(draws, generator=g)
        assert torch.equal(opt.generator.get_state(), g.get_state()), structure


# ---- errors and warnings that name the problem and point at the caller ------------------------------------
def test_misuse_raises_clear_errors_and_the_davda54_warning_points_at_the_caller():
    torch.manual_seed(0)
    model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    opt = ssam.SSAMF(model.parameters(), SGD, num_samples=2, lr=0.1)
    with pytest.raises(ValueError, match=r"not trainable ones of `model`.*\(DDP"):
        opt.update_mask(other, [(torch.randn(2, 3), torch.tensor([0, 1]))])
    sam = ssam.SAM(model.parameters(), SGD, lr=0.1)
    with pytest.raises(ValueError, match="SAM.step needs a closure"):
        sam.step()
    davda = {"state": {}, "param_groups": [dict(sam.param_groups[0], params=[0, 1])]}
    with pytest.warns(UserWarning, match="no base-optimizer state") as record:
        sam.load_state_dict(davda)
    assert not record[0].filename.endswith("ssam.py")  # stacklevel: it points at the caller, not at ssam.py


# ---- sparse_ascent leaves alone what it cannot mask ------------------------------------------------------
def test_sparse_ascent_skips_a_frozen_linear_and_handles_a_linear_without_bias_under_autocast():
    """A frozen Linear (no mask) keeps nn.Linear's forward; a bias-free 2:4 Linear under bf16 autocast gives
    dX = dY (W ⊙ M) in bf16 (by hand from bf16 operands, float64 arithmetic)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 4))
    model[2].requires_grad_(False)
    opt = ssam.SSAMD(model.parameters(), SGD, sparsity=0.5, structure="2:4", total_steps=10, seed=0, lr=0.1)
    x = torch.randn(5, 6).requires_grad_(True)
    with ssam.sparse_ascent(model, opt) as patched:
        assert patched == [model[0]]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()

    def bf(t):
        return t.detach().to(torch.bfloat16).double()

    m0 = opt.state[model[0].weight]["mask"]
    with torch.no_grad():
        a1 = torch.tanh(bf(x) @ bf(model[0].weight).T)
        dh = (torch.ones(5, 4, dtype=torch.float64) @ bf(model[2].weight)) * (1 - a1**2)
    torch.testing.assert_close(x.grad.double(), dh @ (bf(model[0].weight) * m0), rtol=0.05, atol=0.02)


def test_empirical_fisher_reads_no_batch_past_the_last_sample_it_needs():
    """num_samples=6 from batches of 3: two batches, and the data source is not asked for a third (a
    DataLoader may be endless or costly)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False).double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    served = []

    def batches():
        while True:
            assert len(served) < 2, "a third batch was read"
            served.append(1)
            yield x, y

    fisher = ssam.empirical_fisher(model, batches(), 6)
    with torch.no_grad():
        r = torch.softmax(model(x), -1) - F.one_hot(y, 3).double()
    torch.testing.assert_close(
        fisher[model.weight], 2 * torch.einsum("io,ij->oj", r**2, x**2), rtol=1e-12, atol=0
    )


def test_topk_masks_smallest():
    """topk_masks(..., largest=False): the k smallest entries across the tensors."""
    a, b = torch.tensor([5.0, 1.0, 4.0]), torch.tensor([[2.0, 9.0], [0.5, 7.0]])
    got = ssam.topk_masks([a, b], 3, largest=False)
    assert torch.equal(got[0], torch.tensor([False, True, False]))
    assert torch.equal(got[1], torch.tensor([[True, False], [True, False]]))


def test_base_optimizer_instance_keeps_rho_and_adaptive_of_sam():
    """With a base optimizer built by the user, its groups hold no rho or adaptive: SAM's arguments fill them.
    ASAM by hand: eps = rho * w^2 g / (||w g|| + 1e-12)."""
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = ssam.SAM([w], SGD([w], lr=0.1), rho=0.3, adaptive=True)
    assert opt.param_groups[0]["rho"] == 0.3 and opt.param_groups[0]["adaptive"] is True
    w.grad = torch.tensor([0.5, 1.0, -4.0], dtype=torch.float64)
    w0, g = w.detach().clone(), w.grad.clone()
    opt.first_step()
    eps = 0.3 * w0 * w0 * g / (float((w0 * g).norm()) + 1e-12)
    torch.testing.assert_close(w.detach() - w0, eps, rtol=1e-12, atol=0)
    opt.restore()


def test_second_step_leaves_the_gradients_unless_asked():
    """As davda54's: second_step(zero_grad=False) by default, so the descent gradient stays readable."""
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = ssam.SAM([w], SGD, rho=0.1, lr=0.1)
    w.grad = torch.tensor([1.0, 1.0])
    opt.first_step()
    w.grad = torch.tensor([3.0, 4.0])  # the gradient at w + eps
    opt.second_step()
    assert torch.equal(w.grad, torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(w.detach(), torch.tensor([1.0 - 0.3, 2.0 - 0.4]))


def test_costs_of_parameters_missing_from_the_dict_are_zero():
    """costs= from ascent_costs has no entry for a parameter the forward pass does not use: it costs nothing,
    (0, 0, 0), and is allowed at every cut."""
    a, b, c = (nn.Parameter(torch.zeros(10)) for _ in range(3))
    costs = {a: (100, 0, 10), c: (100, 50, 10)}
    opt = ssam.SSAMD(
        [a, b, c], SGD, structure="tensor", sparsity=2 / 3, total_steps=5, seed=0, costs=costs, lr=1
    )
    assert opt.costs == [(100, 0, 10), (0, 0, 0), (100, 50, 10)]
