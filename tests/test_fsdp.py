"""ssam.py under FSDP2 (torch.distributed.fsdp.fully_shard, DTensor parameters).

One spawn of 2 gloo processes on the CPU runs every check (`_worker`); each check compares the sharded run
with the SAME optimizer on the unsharded model fed the full batch (the union of both ranks' batches), in
float64. The parent asserts that every check passed on both processes, then resumes the 2 processes' DCP
checkpoint in its own single process."""

import io
import json
import math
import os
import pathlib
import runpy
import shutil
import traceback
import types
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import lab.data
import ssam
import train

WORLD = 2
RHO = 0.3
EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
CHECKS = [
    "sam",
    "asam",
    "ssamf_unstructured",
    "ssamf_2:4",
    "ssamf_tensor",
    "ssamd_unstructured",
    "ssamd_tensor",
    "resume",
    "bf16",
    "bad_input",
    "dcp_recipe",
    "train_resume",
    "fisher_checksum",
    "mask_placements",
    "seed_none",
]


def mlp(seed=0):
    """Out-dims 16 and 8 (divisible by 4 and by 2), 5 (uneven: shards of 3 and 2 rows), a LayerNorm."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 5)
    ).double()


def shard(model, mp_policy=None):
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, **kw)
    return fully_shard(model, **kw)


def batch(step, n=8):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def mine(x, rank):  # this rank's half of the full batch
    n = len(x) // WORLD
    return x[rank * n : (rank + 1) * n]


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def close(a, b):
    return torch.allclose(full(a), full(b), rtol=1e-10, atol=1e-12)


def sgd_kw():
    return dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def train_step(model, opt, x, y, tensor=False):
    with opt.ascent_pass() if tensor else torch.enable_grad():
        F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def run_pair(make_opt, rank, steps=3, fisher=False, tensor=False, each=None):
    """The same optimizer on the unsharded model (full batch) and the sharded one (this rank's half)."""
    ref, sharded = mlp(), shard(mlp())
    opts = make_opt(ref), make_opt(sharded)
    for t in range(steps):
        x, y = batch(t)
        if fisher and opts[0].mask_update_due:
            data = [batch(50 + t, n=6)]  # the same Fisher samples on every rank, and for the reference
            for model, opt in zip((ref, sharded), opts):
                opt.update_mask(model, data)
        train_step(ref, opts[0], x, y, tensor)
        train_step(sharded, opts[1], mine(x, rank), mine(y, rank), tensor)
        if each:
            each(t, opts)
    for p, q in zip(ref.parameters(), sharded.parameters()):
        assert isinstance(q, torch.distributed.tensor.DTensor)
        assert close(p, q), (p, full(q))
    return ref, sharded, opts


# ---- the checks (each runs on both ranks) -----------------------------------------------------------
def check_sam(rank, adaptive=False):
    norms = []

    def opt(m):
        return ssam.SAM(m.parameters(), torch.optim.SGD, rho=RHO, adaptive=adaptive, **sgd_kw())

    ref, sharded = mlp(), shard(mlp())
    opts = opt(ref), opt(sharded)
    for t in range(3):
        x, y = batch(t)
        for model, o, xs, ys in ((ref, opts[0], x, y), (sharded, opts[1], mine(x, rank), mine(y, rank))):
            F.cross_entropy(model(xs), ys).backward()
            o.first_step(zero_grad=False)  # p.grad is eps now
            eps = torch.cat([full(p.grad).reshape(-1) for p in model.parameters()])
            w = torch.cat([full(p).reshape(-1) for p in model.parameters()])
            if adaptive:  # ASAM: eps = rho w^2 g / ||w g||, so ||eps / |w| || = rho over the entries w != 0
                w = w - eps  # w before the climb
                eps = eps[w != 0] / w[w != 0].abs()
            norms.append(float(eps.norm()))
            o.zero_grad()
            F.cross_entropy(model(xs), ys).backward()
            o.step() if t == 2 else o.second_step()  # step() without closure: GradScaler's and HF's
            o.zero_grad()
    for p, q in zip(ref.parameters(), sharded.parameters()):
        assert close(p, q), (p, full(q))
    assert all(math.isclose(n, RHO, rel_tol=1e-8) for n in norms), norms


def check_ssamf(rank, structure):
    s = 0.5 if structure == "2:4" else 0.6

    def opt(m):
        return ssam.SSAMF(
            m.parameters(), torch.optim.SGD, rho=RHO, sparsity=s, num_samples=6, update_interval=2,
            structure=structure, **sgd_kw(),
        )  # fmt: skip

    masks = []

    def each(t, opts):
        if t % 2 == 0:  # just after an update
            masks.append([(full(a), full(b)) for a, b in zip(opts[0].masks(), opts[1].masks())])
            sharded_masks = zip(opts[1].masked, opts[1].masks())  # each rank holds its parameter's shard
            assert all(
                m.placements == p.placements and m.to_local().shape == p.to_local().shape
                for p, m in sharded_masks
            )

    ref, sharded, opts = run_pair(opt, rank, steps=4, fisher=True, tensor=structure == "tensor", each=each)
    size = sum(p.numel() for p in ref.parameters())
    for pairs in masks:
        for a, b in pairs:
            assert torch.equal(a, b)
        if structure != "tensor":  # a whole-tensor choice cannot hit 1-s exactly
            assert sum(int(b.sum()) for _, b in pairs) == round((1 - s) * size)
    assert opts[1].density() == opts[0].density()
    if structure == "2:4":  # 2 of every 4 rows of the whole tensor; each rank holds 8 of its 16 rows
        w = sharded[0].weight
        assert w.to_local().shape[0] == 8
        assert full(opts[1].state[w]["mask"]).reshape(4, 4, 6).sum(1).eq(2).all()


def check_ssamd(rank, structure):
    s, alpha, T = 0.5, 0.5, 4

    def opt(m):
        return ssam.SSAMD(
            m.parameters(), torch.optim.SGD, rho=RHO, sparsity=s, drop_rate=alpha, update_interval=1,
            total_steps=T, structure=structure, seed=7, **sgd_kw(),
        )  # fmt: skip

    size = sum(p.numel() for p in mlp().parameters())
    prev = [None]

    def each(t, opts):
        new = [full(m) for m in opts[1].masks()]
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, new)  # the same mask on every rank after each update
        assert all(all(torch.equal(a, b) for a, b in zip(new, other)) for other in everyone)
        assert all(torch.equal(a, full(b)) for a, b in zip(opts[0].masks(), new))
        if structure is None:
            assert sum(int(m.sum()) for m in new) == round((1 - s) * size)  # density exact, whole model
            if prev[0] is not None and t > 0:  # Eq. 9 at step t: f_decay(t) (1-s) |w| dropped at most
                n_drop = int(alpha / 2 * (1 + math.cos(t * math.pi / T)) * (1 - s) * size)
                gone = sum(int((a & ~b).sum()) for a, b in zip(prev[0], new))
                assert 0 < gone <= n_drop, (gone, n_drop)
        prev[0] = new

    run_pair(opt, rank, steps=T, tensor=structure == "tensor", each=each)


def resume_opt(model, seed):
    kw = dict(rho=RHO, sparsity=0.5, update_interval=1, total_steps=4, seed=seed)
    return ssam.SSAMD(model.parameters(), torch.optim.SGD, **kw, **sgd_kw())


def check_resume(rank, tmp):
    """SSAM-D (masks, generator, momentum, counters) saved by DCP after 2 steps, loaded into a fresh sharded
    model + optimizer: 2 more steps equal 4 uninterrupted ones bit for bit."""

    def steps(model, o, ts):
        for t in ts:
            x, y = batch(t)
            train_step(model, o, mine(x, rank), mine(y, rank))

    a = shard(mlp())
    oa = resume_opt(a, seed=3)
    steps(a, oa, range(2))
    dcp.save(save_state(a, oa), checkpoint_id=f"{tmp}/ckpt")
    steps(a, oa, range(2, 4))
    b = shard(mlp(seed=1))  # other weights: the checkpoint must overwrite everything
    ob = resume_opt(b, seed=99)  # another seed: the generator's state must come from the checkpoint
    load_state(b, ob, f"{tmp}/ckpt")
    steps(b, ob, range(2, 4))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.to_local(), q.to_local())
    for p, q in zip(oa.masked, ob.masked):
        assert torch.equal(oa.state[p]["mask"].to_local(), ob.state[q]["mask"].to_local())
        assert torch.equal(
            oa.base_optimizer.state[p]["momentum_buffer"].to_local(),
            ob.base_optimizer.state[q]["momentum_buffer"].to_local(),
        )
    assert ob.steps == 4 and torch.equal(oa.generator.get_state(), ob.generator.get_state())
    final = {"weights": [full(p) for p in a.parameters()], "masks": [full(m) for m in oa.masks()]}
    if rank == 0:  # for test_resume_on_one_process
        torch.save(final, f"{tmp}/final.pt")


def save_state(model, opt):
    """What train.py --fsdp saves: sharded, keyed by parameter name (DCP reshards on load)."""
    names = {p: n for n, p in model.named_parameters()}
    return {
        "model": model.state_dict(),
        "base": get_optimizer_state_dict(model, opt.base_optimizer),
        "masks": {names[p]: opt.state[p]["mask"] for p in opt.masked if "mask" in opt.state[p]},
        "counters": {k: v for k, v in opt.state_dict()["counters"].items()},
    }


def load_state(model, opt, path, no_dist=False):
    sd = save_state(model, opt)
    dcp.load(sd, checkpoint_id=path, no_dist=no_dist)
    model.load_state_dict(sd["model"])
    set_optimizer_state_dict(model, opt.base_optimizer, sd["base"])
    names = {p: n for n, p in model.named_parameters()}
    opt.set_masks([sd["masks"][names[p]] for p in opt.masked], count_update=False)
    for k, v in sd["counters"].items():
        getattr(opt, k).set_state(v) if isinstance(getattr(opt, k), torch.Generator) else setattr(opt, k, v)


def check_bf16(rank):
    """bf16 compute (fp32 shards): SAM and SSAM-D step; with lr = 0 the step must leave w bit-exact."""
    pol = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = dict(rho=RHO, lr=0.0)
    for make in (
        lambda m: ssam.SAM(m.parameters(), torch.optim.SGD, **kw),
        lambda m: ssam.SSAMD(m.parameters(), torch.optim.SGD, update_interval=1, total_steps=3, **kw),
    ):
        model = shard(mlp().float(), pol)
        opt = make(model)
        w = [p.to_local().clone() for p in model.parameters()]
        for t in range(2):
            x, y = batch(t)
            loss = F.cross_entropy(model(mine(x, rank).float()), mine(y, rank))
            loss.backward()
            opt.first_step(zero_grad=True)
            assert not all(torch.equal(p.to_local(), v) for p, v in zip(model.parameters(), w))  # perturbed
            F.cross_entropy(model(mine(x, rank).float()), mine(y, rank)).backward()
            opt.second_step(zero_grad=True)
            assert torch.isfinite(loss)
        assert all(torch.equal(p.to_local(), v) for p, v in zip(model.parameters(), w))
        assert all(p.dtype == torch.float32 for p in model.parameters())


def check_bad_input(rank):
    def raises(fn, words):
        try:
            fn()
        except ValueError as e:
            assert words in str(e), e
        else:
            raise AssertionError(f"no ValueError ({words})")

    sharded, plain = shard(mlp()), mlp()
    data = [batch(9, n=4)]
    kw = dict(sparsity=0.5, num_samples=4, lr=0.1)
    o = ssam.SSAMF(sharded.parameters(), torch.optim.SGD, **kw)
    raises(lambda: o.update_mask(plain, data), "not trainable ones of `model`")  # sharded opt, plain model
    o = ssam.SSAMF(plain.parameters(), torch.optim.SGD, **kw)
    raises(lambda: o.update_mask(sharded, data), "not trainable ones of `model`")  # and the reverse
    late = mlp()
    o = ssam.SSAMF(late.parameters(), torch.optim.SGD, **kw)  # built before fully_shard swaps the parameters
    shard(late)
    raises(lambda: o.update_mask(late, data), "not trainable ones of `model`")
    o = ssam.SSAMF(
        sharded.parameters(), torch.optim.SGD, structure="2:4", **kw
    )  # 2:4 backward: unsharded only
    raises(lambda: ssam.sparse_ascent(sharded, o).__enter__(), "not FSDP2")
    mixed = list(sharded.parameters()) + list(plain.parameters())
    raises(lambda: ssam.SAM(mixed, torch.optim.SGD, lr=0.1), "DTensor")
    o = ssam.SSAMF(sharded.parameters(), torch.optim.SGD, **kw)
    w = [p.to_local().clone() for p in sharded.parameters()]
    F.cross_entropy(sharded(mine(data[0][0], rank)), mine(data[0][1], rank)).backward()
    grads = [p.grad for p in sharded.parameters()]
    g = [p.grad.to_local().clone() for p in sharded.parameters()]
    raises(lambda: o.update_mask(sharded, [batch(9 + rank, n=4)]), "differ between ranks")  # other samples
    x1 = data[0][0].clone()
    x1[1] += rank  # rank 1's second sample differs, the rest are the same
    raises(lambda: o.update_mask(sharded, [(x1, data[0][1])]), "differ between ranks")
    assert all(torch.equal(p.to_local(), v) for p, v in zip(sharded.parameters(), w))
    assert o.last_mask_update < 0  # no mask set
    o.update_mask(sharded, data)  # the same samples: fine, and the caller's gradients are back, unchanged
    assert all(
        p.grad is gr and torch.equal(gr.to_local(), v) for p, gr, v in zip(sharded.parameters(), grads, g)
    )


def resume_pair(make, rank, stop, path, save, load, steps=5):
    """A run of `steps` steps straight, and one saved before step `stop` (by save(model, opt)), loaded into a
    fresh model (other weights) and optimizer by load(model, opt, path) and run on: equal bit for bit."""

    def run(model, opt, ts):
        for t in ts:
            if isinstance(opt, ssam.SSAMF) and opt.mask_update_due:
                opt.update_mask(model, [batch(50, n=6)])  # the same samples on every rank
            x, y = batch(t)
            train_step(model, opt, mine(x, rank), mine(y, rank))

    a = shard(mlp())
    oa = make(a, 3)
    run(a, oa, range(stop))
    dcp.save(save(a, oa), checkpoint_id=path)
    run(a, oa, range(stop, steps))
    b = shard(mlp(seed=1))
    ob = make(b, 99)  # SSAM-D: another seed, the generator must come from the checkpoint
    load(b, ob, path)
    run(b, ob, range(stop, steps))
    assert all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(a.parameters(), b.parameters()))
    assert (
        oa.steps == ob.steps == steps
        and oa.state_dict()["counters"].keys() == ob.state_dict()["counters"].keys()
    )
    for p, q in zip(oa.masked if hasattr(oa, "masked") else [], ob.masked if hasattr(ob, "masked") else []):
        assert torch.equal(oa.state[p]["mask"].to_local(), ob.state[q]["mask"].to_local())
    for p, q in zip(a.parameters(), b.parameters()):
        u, v = oa.base_optimizer.state[p]["momentum_buffer"], ob.base_optimizer.state[q]["momentum_buffer"]
        assert torch.equal(u.to_local(), v.to_local())


MAKERS = {
    "sam": lambda m, seed: ssam.SAM(m.parameters(), torch.optim.SGD, rho=RHO, **sgd_kw()),
    "ssamf": lambda m, seed: ssam.SSAMF(
        m.parameters(), torch.optim.SGD, rho=RHO, num_samples=6, update_interval=3, **sgd_kw()
    ),
    "ssamd": lambda m, seed: ssam.SSAMD(
        m.parameters(), torch.optim.SGD, rho=RHO, update_interval=2, total_steps=5, seed=seed, **sgd_kw()
    ),
}


def check_dcp_recipe(rank, tmp):
    """examples/fsdp_checkpoint.py's state() and load(): SAM, SSAM-D, SSAM-F saved before its first mask
    (a fresh optimizer, no mask yet) and between two updates (interval 3, saved at step 2). torch's
    get_optimizer_state_dict / set_optimizer_state_dict on the SSAM itself: refused, nothing loaded; on a
    dense SAM: an error that points to the base optimizer."""
    ex = runpy.run_path(str(EXAMPLES / "fsdp_checkpoint.py"))
    for name, stop in (("sam", 2), ("ssamf", 0), ("ssamf", 2), ("ssamd", 3)):
        resume_pair(MAKERS[name], rank, stop, f"{tmp}/recipe-{name}{stop}", ex["state"], ex["load"])
    model = shard(mlp())  # torch's own recipe on the SSAM itself: the load says what it leaves out
    opt = MAKERS["ssamd"](model, 3)
    osd = get_optimizer_state_dict(model, opt)
    masks = [m.clone() for m in opt.masks()]
    try:
        set_optimizer_state_dict(model, opt, osd)
        raise AssertionError(
            "torch's set_optimizer_state_dict loaded an SSAM state_dict without its counters"
        )
    except ValueError as e:
        assert "without 'base' and 'counters'" in str(e), e
    assert all(torch.equal(m, n) for m, n in zip(masks, opt.masks()))  # nothing loaded
    dense = shard(mlp())  # dense SAM: torch's recipe steps the optimizer, and the error says what to do
    sam = MAKERS["sam"](dense, 0)
    try:
        get_optimizer_state_dict(dense, sam)
        raise AssertionError("torch's get_optimizer_state_dict stepped a SAM without a closure")
    except ValueError as e:
        assert "pass opt.base_optimizer" in str(e), e


def check_train_resume(rank, tmp):
    """train.py --fsdp's sharded_state() and load_shards(): SSAM-F with update interval 3 saved at step 2
    (a mask, not due) and at step 0 (no mask yet), SSAM-D saved at step 3."""

    def save(model, opt):
        return train.sharded_state(types.SimpleNamespace(raw_model=model, opt=opt))

    def load(model, opt, path):
        train.load_shards(types.SimpleNamespace(raw_model=model, opt=opt), path)

    for name, stop in (("ssamf", 2), ("ssamf", 0), ("ssamd", 3)):
        resume_pair(MAKERS[name], rank, stop, f"{tmp}/train-{name}{stop}", save, load)


def check_fisher_checksum(rank):
    """update_mask's check that every rank passes the same Fisher samples, on per-sample losses chosen by
    loss_fn: refused when one rank's differ ((1e-4, 1e-4) against (2e-4, 1e-4); (1, 1) against (0.5, 2) or
    (1.75, 0.5): sums weighted by 1/(i+1) or by i+2 would match), accepted when equal, all 0 included, and
    when the checksums differ by 1e-6 of the largest (1e6 against 999999), refused beyond."""

    def update(losses):
        sharded = shard(mlp())
        opt = ssam.SSAMF(sharded.parameters(), torch.optim.SGD, num_samples=len(losses[rank]), lr=0.1)
        x = batch(9, n=len(losses[rank]))[0]
        y = torch.tensor(losses[rank], dtype=torch.float64)
        opt.update_mask(sharded, [(x, y)], loss_fn=lambda out, y: out.sum() * 0 + y.sum())

    for differ in (
        [(1e-4, 1e-4), (2e-4, 1e-4)],
        [(1, 1), (0.5, 2)],
        [(1, 1), (1.75, 0.5)],
        [(1e6,), (999998,)],
    ):
        try:
            update(differ)
        except ValueError as e:
            assert "differ between ranks" in str(e), e
        else:
            raise AssertionError(f"per-sample losses {differ} by rank: no ValueError")
    for same in ([(0, 0), (0, 0)], [(1.5, 2.5), (1.5, 2.5)], [(1e6,), (999999,)]):
        update(same)


def check_mask_placements(rank):
    """set_masks with DTensor masks in other placements (replicated): each parameter keeps the mask in its own
    placements (its shard), the whole mask the one given."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    sharded = shard(mlp())
    opt = ssam.SSAMF(sharded.parameters(), torch.optim.SGD, num_samples=4, lr=0.1)
    g = torch.Generator().manual_seed(5)
    whole = [torch.rand(p.shape, generator=g) < 0.5 for p in opt.masked]
    opt.set_masks([distribute_tensor(m, p.device_mesh, [Replicate()]) for m, p in zip(whole, opt.masked)])
    for p, m, w in zip(opt.masked, opt.masks(), whole):
        assert m.placements == p.placements and m.to_local().shape == p.to_local().shape
        assert torch.equal(m.full_tensor(), w)


def check_seed_none(rank):
    """SSAMD(seed=None) after torch.manual_seed(rank): each rank draws its own generator seed, yet every rank
    holds rank 0's mask (set_masks distributes it) and the density is exact, initially and after updates."""
    sharded = shard(mlp())
    torch.manual_seed(rank)  # after mlp(), which seeds 0
    kw = dict(rho=RHO, sparsity=0.5, update_interval=1, total_steps=3, seed=None, lr=0.1)
    opt = ssam.SSAMD(sharded.parameters(), torch.optim.SGD, **kw)
    size = sum(p.numel() for p in opt.masked)
    for t in range(3):
        whole = torch.cat([m.full_tensor().flatten() for m in opt.masks()])
        everyone = [torch.zeros_like(whole) for _ in range(WORLD)]
        dist.all_gather(everyone, whole)
        assert all(torch.equal(everyone[0], e) for e in everyone), f"step {t}: the ranks' masks differ"
        assert int(whole.sum()) == round(0.5 * size), (t, int(whole.sum()))
        x, y = batch(t)
        train_step(sharded, opt, mine(x, rank), mine(y, rank))


def _worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    runs = {
        "sam": lambda: check_sam(rank),
        "asam": lambda: check_sam(rank, adaptive=True),
        "ssamf_unstructured": lambda: check_ssamf(rank, None),
        "ssamf_2:4": lambda: check_ssamf(rank, "2:4"),
        "ssamf_tensor": lambda: check_ssamf(rank, "tensor"),
        "ssamd_unstructured": lambda: check_ssamd(rank, None),
        "ssamd_tensor": lambda: check_ssamd(rank, "tensor"),
        "resume": lambda: check_resume(rank, tmp),
        "bf16": lambda: check_bf16(rank),
        "bad_input": lambda: check_bad_input(rank),
        "dcp_recipe": lambda: check_dcp_recipe(rank, tmp),
        "train_resume": lambda: check_train_resume(rank, tmp),
        "fisher_checksum": lambda: check_fisher_checksum(rank),
        "mask_placements": lambda: check_mask_placements(rank),
        "seed_none": lambda: check_seed_none(rank),
    }
    results = {}
    for name in CHECKS:
        try:
            runs[name]()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        dist.barrier()
    torch.save(results, f"{tmp}/results{rank}.pt")
    dist.destroy_process_group()


def test_fsdp_matches_unsharded(tmp_path):
    """One spawn (not one per check: each costs seconds, and pytest-xdist would repeat a module fixture)."""
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD)
    results = [torch.load(tmp_path / f"results{r}.pt") for r in range(WORLD)]
    failed = [
        f"{name} (rank {r}):\n{res[name]}"
        for name in CHECKS
        for r, res in enumerate(results)
        if res[name] != "ok"
    ]
    assert not failed, "\n".join(failed)
    check_resume_on_one_process(tmp_path)


def check_resume_on_one_process(tmp):
    """The DCP checkpoint that 2 processes wrote after 2 steps, loaded into the unsharded model and optimizer
    in this one process (DCP reshards): 2 more steps on the full batch give the weights and masks of the
    2-process run (weights to rounding: the ranks' gradient mean adds in another order; masks exactly)."""
    model = mlp(seed=1)
    opt = resume_opt(model, seed=99)
    with warnings.catch_warnings():  # DCP says it loads in one process: what we ask for
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        load_state(model, opt, f"{tmp}/ckpt", no_dist=True)
    assert opt.steps == 2
    for t in range(2, 4):
        train_step(model, opt, *batch(t))
    final = torch.load(f"{tmp}/final.pt")
    assert all(close(p, q) for p, q in zip(model.parameters(), final["weights"]))
    assert all(torch.equal(m, q) for m, q in zip(opt.masks(), final["masks"]))


# ---- train.py --fsdp: 2 processes through 2 epochs of the tiny model, a crash, --resume ------------------
TRAIN = ["--model", "wrn10-1", "--batch-size", "32", "--train-size", "64", "--epochs", "2", "--device", "cpu"]
TRAIN += ["--optimizer", "ssamd", "--update-interval", "1", "--fsdp", "--sync-ascent", "--eval-every", "2"]


def small_subset():
    """The shipped subset's first 64 training and 1000 test images: decoding all 15,000 (load_subset) and
    testing on 10,000 would take most of this test's time, once in each process."""
    z = np.load(lab.data.ROOT / "data" / "cifar10_subset.npz")
    out = []
    for split, n in (("train", 64), ("test", 1000)):
        buf, off = z[f"{split}_jpeg"].tobytes(), z[f"{split}_offsets"]
        x = lab.data.to_uint8([lab.data.read_image(io.BytesIO(buf[off[i] : off[i + 1]])) for i in range(n)])
        out += [x, torch.from_numpy(z[f"{split}_labels"][:n].astype(np.int64))]
    return out


def run_train(tmp, name, *flags):
    argv = [*TRAIN, "--out-dir", f"{tmp}/{name}", *flags]
    return train.train(train.resolve_config(train.get_args(argv)), show_config=False)


def _train_worker(rank, tmp):
    torch.set_num_threads(1)
    lab.data.load_subset = small_subset
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    results = {}
    try:
        results["straight"] = run_train(tmp, "straight")["test_acc"]
        real_step, calls = train.train_step, []

        def crashing_step(*args, **kw):  # Ctrl-C in step 1 of epoch 2, on both processes
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real_step(*args, **kw)

        train.train_step = crashing_step
        try:
            run_train(tmp, "crashed")
        except KeyboardInterrupt:
            results["crashed"] = True
        train.train_step = real_step
        dist.barrier()
        if rank == 0:  # the epoch-1 checkpoint, for a resume on 1 process
            shutil.copytree(f"{tmp}/crashed", f"{tmp}/one")
        dist.barrier()
        results["resumed"] = run_train(tmp, "crashed", "--resume")["test_acc"]
        try:
            run_train(tmp, "diverged", "--lr", "1e6")
        except train.Diverged as e:
            results["diverged"] = str(e)
    except Exception:
        results["error"] = traceback.format_exc()
    torch.save(results, f"{tmp}/train{rank}.pt")
    dist.destroy_process_group()


def whole_checkpoint(run_dir):
    """A --fsdp run's ckpt.pt, and its DCP shards read whole in this process as {dotted key: value}."""
    ck = torch.load(run_dir / "ckpt.pt", weights_only=False)
    dcp_to_torch_save(run_dir / ck["shards"], run_dir / "whole.pt")

    def flat(d, pre=""):
        return {
            k: v
            for key, x in d.items()
            for k, v in (flat(x, f"{pre}{key}.") if isinstance(x, dict) else {f"{pre}{key}": x}).items()
        }

    return ck, flat(torch.load(run_dir / "whole.pt", weights_only=False))


def same(a, b):
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def test_train_fsdp_two_processes_crash_resume_and_divergence(tmp_path, monkeypatch):
    """train.py --fsdp on 2 gloo processes: a run that crashes in epoch 2 and resumes ends bit-exact where the
    straight run ends; its epoch-1 checkpoint resumes on 1 process too (DCP reshards); a diverging run stops
    on both processes (none is left waiting in a collective)."""
    mp.spawn(_train_worker, args=(str(tmp_path),), nprocs=WORLD)
    res = [torch.load(tmp_path / f"train{r}.pt") for r in range(WORLD)]
    assert all("error" not in r for r in res), res[0].get("error") or res[1].get("error")
    assert all(r["crashed"] and r["resumed"] == r["straight"] for r in res)
    assert all("training diverged" in r["diverged"] for r in res)
    (ca, a), (cb, b) = whole_checkpoint(tmp_path / "straight"), whole_checkpoint(tmp_path / "crashed")
    assert ca["epoch"] == cb["epoch"] == 2 and ca["shards"] == "ckpt-e2.dcp" and ca["model"] is None
    assert sorted(a) == sorted(b) and all(same(a[k], b[k]) for k in a)
    assert any(k.startswith("masks.") for k in a) and any("momentum_buffer" in k for k in a)
    lines = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [line["ranks_in_sync"] for line in lines] == [True, True] and lines[1]["density"] == 0.5
    # the epoch-1 checkpoint of 2 processes, resumed by 1 (torchrun --nproc_per_node 1)
    monkeypatch.setattr(lab.data, "load_subset", small_subset)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store1", rank=0, world_size=1)
    try:
        run_train(tmp_path, "one", "--resume")
    finally:
        dist.destroy_process_group()
    c1, one = whole_checkpoint(tmp_path / "one")
    log = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert c1["epoch"] == 2 and [line["epoch"] for line in log] == [1, 2] and sorted(one) == sorted(a)
    # not equal: BatchNorm normalizes each process's share of the batch (16 images on 2 processes, 32 on 1)
    weights = [k for k in a if k.startswith("model.") and k.endswith("weight")]
    assert max(float((a[k] - one[k]).abs().max()) for k in weights) < 1e-2


def test_fsdp_flags_that_cannot_work_are_errors(monkeypatch):
    def cfg(*flags):
        return train.resolve_config(train.get_args(["--fsdp", *flags]))

    with pytest.raises(SystemExit, match="add --sync-ascent"):
        cfg("--optimizer", "ssamd")  # FSDP2's ascent gradient is the whole batch's: say so in the config
    sam = ["--optimizer", "ssamf", "--sync-ascent"]
    with pytest.raises(SystemExit, match="--amp fp16"):
        cfg(*sam, "--amp", "fp16")
    with pytest.raises(SystemExit, match="--sparse-ascent"):
        cfg(*sam, "--structure", "2:4", "--sparse-ascent")
    with pytest.raises(SystemExit, match="--mask-select cost"):
        cfg(*sam, "--structure", "tensor", "--mask-select", "cost")
    assert cfg("--optimizer", "sgd").fsdp is True  # SGD has no ascent
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="run under torchrun"):
        train.setup_distributed(cfg(*sam, "--device", "cpu"))
