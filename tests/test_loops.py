"""ssam.py in the loops people already train with. Each test runs an example of examples/ with the
real package (torch.amp, accelerate, timm, Lightning, transformers) and checks its numbers against a plain
loop written here: first_step / second_step by hand, the README's fp32 loop."""

import copy
import functools
import inspect
import pathlib
import runpy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ssam

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@functools.cache
def example(name):
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"examples.{name}")


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def batch(seed=0, n=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def make_opt(kind, params, **kw):
    kw = dict(dict(lr=0.1, momentum=0.9, weight_decay=5e-3, rho=0.05), **kw)
    if kind == "sam":
        return ssam.SAM(params, torch.optim.SGD, **kw)
    if kind == "ssamf":
        return ssam.SSAMF(params, torch.optim.SGD, **dict(dict(num_samples=8, update_interval=2), **kw))
    if kind == "looksam":  # LookSAM-2: the ascent every 2 steps, g_v added between
        return ssam.SAM(params, torch.optim.SGD, **dict(dict(ascent_every=2, looksam_alpha=0.7), **kw))
    return ssam.SSAMD(params, torch.optim.SGD, **dict(dict(total_steps=10, update_interval=2, seed=0), **kw))


def plain_step(model, opt, x, y, clip=None, fisher=None):
    """The README's fp32 loop: the oracle. Clipping, if any, of the descent gradient."""
    if isinstance(opt, ssam.SSAMF) and opt.mask_update_due:
        opt.update_mask(model, fisher or [(x, y)])
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with ssam.frozen_bn_stats(model):
        F.cross_entropy(model(x), y).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.second_step(zero_grad=True)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and torch.equal(u, v), (u - v).abs().max()


def fixed_scaler(scale=2.0**12):
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**9)


# ---- torch.amp: GradScaler (fp16 logic on the CPU), bf16 autocast, clipping ------------------------
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("kind", ["sam", "ssamf", "ssamd"])
def test_gradscaler_fixed_scale_equals_fp32_bitwise(kind, clip):
    """fp32 compute, a fixed power-of-2 scale: scaling and unscaling are exact, so the example's GradScaler
    loop (its unscale of pass 1, its clipping after unscale_) gives the fp32 loop's weights bit for bit."""
    sam_step = example("amp")["sam_step"]
    a, b = mlp(), mlp()
    oa, ob = make_opt(kind, a.parameters()), make_opt(kind, b.parameters())
    scaler = fixed_scaler()
    for s in range(4):
        x, y = batch(s)
        if kind == "ssamf" and ob.mask_update_due:
            ob.update_mask(b, [(x, y)])
        sam_step(b, ob, scaler, x, y, clip=clip)
        plain_step(a, oa, x, y, clip=clip)
    assert_bitwise(weights(b), weights(a))
    assert ob.steps == oa.steps == 4 and scaler.get_scale() == 2.0**12
    assert_bitwise(
        [t for s in ob.state_dict()["base"]["state"].values() for t in s.values()],
        [t for s in oa.state_dict()["base"]["state"].values() for t in s.values()],
    )
    if clip is not None:  # the test can fail: clipping changes the weights here
        c = mlp()
        oc = make_opt(kind, c.parameters())
        for s in range(4):
            plain_step(c, oc, *batch(s))
        assert not all(torch.equal(u, v) for u, v in zip(weights(c), weights(a)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_fp16_and_bf16_close_to_fp32(dtype):
    """Real fp16 (GradScaler, dynamic scale) and bf16 autocast on the CPU: weights after 4 steps within 2% of
    the fp32 loop's change of the weights (fp16: 10 mantissa bits, bf16: 7)."""
    sam_step = example("amp")["sam_step"]
    a, b = mlp(), mlp()
    w0 = weights(a)
    oa, ob = make_opt("ssamd", a.parameters()), make_opt("ssamd", b.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    for s in range(4):
        x, y = batch(s)
        sam_step(b, ob, scaler, x, y, torch.autocast("cpu", dtype=dtype), clip=1.0)
        plain_step(a, oa, x, y, clip=1.0)
    change = max((u - w).abs().max() for u, w in zip(weights(a), w0))
    err = max((u - v).abs().max() for u, v in zip(weights(b), weights(a)))
    assert ob.steps == 4 and 0 < err <= 0.02 * change, (err, change)


class InfAt(nn.Module):
    """Multiplies the output by inf on the forward calls listed (0-based): an overflow in that pass."""

    def __init__(self, net, calls):
        super().__init__()
        self.net, self.calls, self.n = net, calls, 0

    def forward(self, x):
        out = self.net(x)
        self.n += 1
        return out * float("inf") if self.n - 1 in self.calls else out


@pytest.mark.parametrize("bad_pass", [1, 2])
@pytest.mark.parametrize("kind", ["sam", "ssamd"])
def test_gradscaler_inf_in_either_pass_skips_exactly(kind, bad_pass):
    """Step 2 overflows in pass 1 or pass 2: w bit-exact, momentum untouched, no step counted, the scale
    halved; the steps around it run (clipping, unscale_ each optimizer once: no RuntimeError) and match the
    fp32 loop that simply leaves step 2 out."""
    sam_step = example("amp")["sam_step"]
    b = InfAt(mlp(), calls={2 + bad_pass - 1})  # step 0: calls 0, 1; step 1: calls 2, 3
    ob = make_opt(kind, b.parameters(), **({"update_interval": 100} if kind == "ssamd" else {}))
    a = mlp()
    oa = make_opt(kind, a.parameters(), **({"update_interval": 100} if kind == "ssamd" else {}))
    scaler = fixed_scaler()
    sam_step(b, ob, scaler, *batch(0), clip=1.0)
    plain_step(a, oa, *batch(0), clip=1.0)
    w, mom = weights(b), [t.clone() for s in ob.base_optimizer.state.values() for t in s.values()]
    sam_step(b, ob, scaler, *batch(1), clip=1.0)
    assert_bitwise(weights(b), w)
    assert_bitwise([t for s in ob.base_optimizer.state.values() for t in s.values()], mom)
    assert ob.steps == 1 and scaler.get_scale() == 2.0**11 and ob._w is None
    sam_step(b, ob, scaler, *batch(2), clip=1.0)
    plain_step(a, oa, *batch(2), clip=1.0)
    assert_bitwise(weights(b), weights(a))
    assert ob.steps == 2 and scaler.get_scale() == 2.0**11


def test_clipping_is_of_the_descent_gradient_and_eps_norm_stays_rho():
    """The example clips after pass 2 (after unscale_): the SGD update (lr 0.1, no momentum or decay) has norm
    lr * clip; eps (the weights pass 2 runs at, minus w) has norm rho under a clip far below ||g||."""
    sam_step = example("amp")["sam_step"]
    model = mlp(dtype=torch.float64)
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(weights(m)))
    scaler = fixed_scaler()

    def norm(xs, ys):
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(u - v) for u, v in zip(xs, ys)])
        )

    for s in range(3):
        x, y = batch(s, dtype=torch.float64)
        sam_step(model, opt, scaler, x, y, clip=1e-4)
        w, w_eps = seen[-2], seen[-1]
        assert abs(norm(w_eps, w).item() - 0.05) < 1e-12  # ||eps|| = rho
        assert (
            abs(norm(weights(model), w).item() - 0.1 * 1e-4) < 1e-10
        )  # lr * clip (clip_grad_norm_: norm + 1e-6)


# ---- gradient accumulation, accelerate, timm --------------------------------------------------------
@pytest.mark.parametrize("kind", ["sam", "ssamf", "ssamd"])
def test_accumulation_k_micro_batches_equal_one_full_batch_step(kind):
    """BatchNorm-free, float64: 4 micro-batches of 8 per step give the full batch's step (SSAM-F's Fisher from
    the micro-batches, SSAM-D's drop-and-grow from the accumulated gradient): weights and masks to 1e-12."""
    step = example("accumulation")["sam_step_accumulated"]
    a, b = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    oa, ob = make_opt(kind, a.parameters()), make_opt(kind, b.parameters())
    for s in range(4):
        x, y = batch(s, n=32, dtype=torch.float64)
        micro = list(zip(x.chunk(4), y.chunk(4)))
        if kind == "ssamf" and ob.mask_update_due:
            ob.update_mask(b, micro)
        step(b, ob, micro)
        plain_step(a, oa, x, y)
        if kind != "sam":
            assert all(torch.equal(u, v) for u, v in zip(ob.masks(), oa.masks()))
    for u, v in zip(weights(b), weights(a)):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=0)
    assert ob.steps == 4 and (kind == "sam" or ob.last_mask_update == oa.last_mask_update == 2)


@pytest.mark.parametrize("kind", ["sam", "ssamd"])
def test_accelerate_no_sync_and_accumulate_equal_the_plain_loop(kind):
    """accelerate (the real Accelerator, one CPU process): no_sync ascent, accumulate(model) descent over 2
    micro-batches, AcceleratedOptimizer.step() as SAM's second step: the plain full-batch loop's weights."""
    train = example("accelerate_loop")["train"]
    a, b = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    oa, ob = make_opt(kind, a.parameters()), make_opt(kind, b.parameters())
    batches = [batch(s, n=32, dtype=torch.float64) for s in range(4)]
    b = train(b, ob, batches, k=2)
    for x, y in batches:
        plain_step(a, oa, x, y)
    for u, v in zip(weights(b), weights(a)):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=0)
    assert ob.steps == 4 and ob._w is None


@pytest.mark.parametrize("kind", ["sam", "ssamd"])
def test_timm_optimizer_factory_groups_kept(kind):
    """timm's test_resnet (no pretrained weights) and create_optimizer_v2's groups (no decay on norms and
    biases) wrapped by SSAM: the groups keep their weight_decay and get rho; the weights equal a plain loop
    over groups built here by timm's documented rule (decay only on tensors of 2+ dimensions)."""
    ex = example("timm_model")
    model, opt = ex["build"](kind=kind, total_steps=10)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 5e-4]
    assert all(g["rho"] == 0.05 and g["lr"] == 0.05 for g in opt.param_groups)
    ref = copy.deepcopy(model)
    plain = [p for p in ref.parameters() if p.ndim <= 1], [p for p in ref.parameters() if p.ndim > 1]
    groups = [{"params": plain[0], "weight_decay": 0.0}, {"params": plain[1], "weight_decay": 5e-4}]
    base = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    oref = ssam.SAM(ref.parameters(), base) if kind == "sam" else None
    if kind != "sam":
        oref = ssam.SSAMD(base.param_groups, base, rho=0.05, sparsity=0.5, total_steps=10, seed=0)
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        ex["sam_step"](model, opt, x, y)
        plain_step(ref, oref, x, y)
    assert_bitwise(weights(model), weights(ref))
    assert_bitwise(
        [b for m in model.modules() for b in m.buffers()], [b for m in ref.modules() for b in m.buffers()]
    )


# ---- Lightning ---------------------------------------------------------------------------------------
def lightning_fit(module, loader, root, max_epochs, ckpt_path=None):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=[checkpoints], **quiet)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def test_lightning_counts_steps_checkpoints_and_resumes_exactly(tmp_path):
    """SSAM-F (momentum; mask refreshed every 2 steps from on_train_batch_start) in a LightningModule with
    automatic_optimization=False: global_step counts optimizer steps, ModelCheckpoint saves at step 2, and a
    run resumed from that file ends (step 4) bit-exact on the plain loop's weights, as does the whole run."""
    SAMModule = example("lightning_loop")["SAMModule"]

    def make(ps):
        return ssam.SSAMF(
            ps, torch.optim.SGD, rho=0.05, num_samples=8, update_interval=2, lr=0.1, momentum=0.9
        )

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    torch.manual_seed(0)
    module = SAMModule(make)
    ref, whole = copy.deepcopy(module.net), copy.deepcopy(module)
    oref = make(ref.parameters())
    for _ in range(2):
        for xb, yb in loader:
            plain_step(ref, oref, xb, yb)
    trainer = lightning_fit(module, loader, tmp_path / "a", max_epochs=1)
    assert trainer.global_step == 2 and [p.name for p in (tmp_path / "a").iterdir()] == [
        "epoch=0-step=2.ckpt"
    ]
    resumed = SAMModule(make)
    trainer = lightning_fit(
        resumed, loader, tmp_path / "b", 2, ckpt_path=tmp_path / "a" / "epoch=0-step=2.ckpt"
    )
    assert (
        trainer.global_step == 4
        and sorted(p.name for p in (tmp_path / "b").iterdir())[-1] == "epoch=1-step=4.ckpt"
    )
    sam = trainer.optimizers[0]
    assert sam.steps == 4 and sam.last_mask_update == 2  # the hook refreshed the mask after the resume
    assert_bitwise(weights(resumed.net), weights(ref))
    assert all(torch.equal(u, v) for u, v in zip(sam.masks(), oref.masks()))
    lightning_fit(whole, loader, tmp_path / "c", max_epochs=2)
    assert_bitwise(weights(whole.net), weights(ref))


def test_lightning_with_looksam_takes_one_pass_between_ascents(tmp_path):
    """LookSAM-3 in the example's module (fp32): SAM.step(closure) skips the closure between ascents; the
    weights equal the README's loop that takes the second pass only when opt.ascent_due, bit for bit."""
    import lightning as L

    def make(ps):
        return make_opt("looksam", ps, ascent_every=3)

    module = example("lightning_loop")["SAMModule"](make)
    module.net, ref = mlp(), mlp()
    oref, data = make(ref.parameters()), [batch(s) for s in range(5)]
    for x, y in data:
        F.cross_entropy(ref(x), y).backward()
        if oref.ascent_due:
            oref.first_step(zero_grad=True)
            F.cross_entropy(ref(x), y).backward()
        oref.step()  # the second step, or the step between ascents
        oref.zero_grad()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*map(torch.cat, zip(*data))), batch_size=16
    )
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, enable_checkpointing=False, **quiet)
    trainer.fit(module, loader)
    sam = trainer.optimizers[0]
    assert trainer.global_step == sam.steps == 5 and "g_v" in sam.state[module.net[0].weight]
    assert_bitwise(weights(module.net), weights(ref))


def test_lightning_checkpoint_without_ssam_state(tmp_path):
    """A Lightning checkpoint whose optimizer state lost an SSAM entry ('base': the base optimizer's state,
    'counters'): the resume warns, naming what is missing, and loads only the group settings (as the warning
    says: the SAM step counter starts again from 0)."""
    SAMModule = example("lightning_loop")["SAMModule"]

    def make(ps):
        return ssam.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    x, y = batch(0, n=16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 16), y), batch_size=8)
    lightning_fit(SAMModule(make), loader, tmp_path / "a", max_epochs=1)
    ckpt = torch.load(tmp_path / "a" / "epoch=0-step=2.ckpt", weights_only=False)
    for lost in ["counters", "base"]:
        bad = copy.deepcopy(ckpt)
        del bad["optimizer_states"][0][lost]
        torch.save(bad, tmp_path / f"no-{lost}.ckpt")
        with pytest.warns(UserWarning, match=f"no \\['{lost}'\\] in state_dict"):
            trainer = lightning_fit(SAMModule(make), loader, tmp_path / lost, 2, tmp_path / f"no-{lost}.ckpt")
        assert trainer.global_step == 4 and trainer.optimizers[0].steps == 2


# ---- Hugging Face Trainer -----------------------------------------------------------------------------
def stack(samples):
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def hf_opt(kind, params):
    kw = dict(rho=0.05, lr=0.1, momentum=0.9)
    if kind == "sam":
        return ssam.SAM(params, torch.optim.SGD, **kw)
    if kind == "ssamf":
        return ssam.SSAMF(params, torch.optim.SGD, num_samples=8, update_interval=2, **kw)
    if kind == "looksam":  # LookSAM-3: steps 0 and 3 climb; the checkpoint at 2 is mid-period (g_v kept)
        return ssam.SAM(params, torch.optim.SGD, ascent_every=3, looksam_alpha=0.7, **kw)
    return ssam.SSAMD(params, torch.optim.SGD, total_steps=4, update_interval=2, seed=0, **kw)


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # the oracle calls second_step, not step
@pytest.mark.parametrize("kind", ["sam", "ssamf", "ssamd", "looksam"])
def test_hf_trainer_clips_schedules_and_resumes_like_the_plain_loop(kind, tmp_path):
    """The example's Trainer subclass (tiny BERT from a config, padded dict batches, max_grad_norm 0.05 so
    that Trainer's clipping bites, linear LR decay): 4 steps, checkpoint at 2, resume to 4: the weights equal
    the plain loop that clips the descent gradient and decays lr by (4 - t) / 4, written here; so does the
    uninterrupted run. LookSAM-3: the loop's second pass only when opt.ascent_due; resumed mid-period."""
    ex = example("hf_trainer")
    data = ex["token_data"]()
    torch.manual_seed(0)
    ref = ex["tiny_bert"]()
    oref = hf_opt(kind, ref.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(oref, lambda t: (4 - t) / 4)
    for t in range(4):
        b = stack(data[8 * t : 8 * t + 8])
        if kind == "ssamf" and oref.mask_update_due:
            oref.update_mask(ref, [b])
        ref(**b).loss.backward()
        if oref.ascent_due:
            oref.first_step(zero_grad=True)
            ref(**b).loss.backward()
        assert torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05) > 0.05  # the clip bites
        oref.step()  # the second step, or the step between ascents
        oref.zero_grad()
        sched.step()

    def run(out, resume=None):
        model = ex["tiny_bert"]()
        opt = hf_opt(kind, model.parameters())
        args = ex["arguments"](str(out), 4, max_grad_norm=0.05, save_strategy="steps", save_steps=2)
        trainer = ex["SAMTrainer"](model=model, args=args, train_dataset=data, optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
        assert trainer.state.global_step == 4 and opt.steps == 4
        return model, opt

    model, opt = run(tmp_path / "a")
    assert_bitwise(weights(model), weights(ref))
    resumed, ropt = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert_bitwise(weights(resumed), weights(ref))
    assert ropt.param_groups[0]["lr"] == oref.param_groups[0]["lr"] == 0.0
    if kind == "looksam":  # g_v of step 3's ascent, the same on both
        assert_bitwise([ropt.state[p]["g_v"] for p in resumed.parameters() if p in ropt.state],
                       [oref.state[p]["g_v"] for p in ref.parameters() if p in oref.state])  # fmt: skip
    if kind in ("ssamf", "ssamd"):
        assert (
            all(torch.equal(u, v) for u, v in zip(ropt.masks(), oref.masks())) and ropt.last_mask_update == 2
        )


def test_hf_trainer_callback_restores_w_after_a_skipped_step(tmp_path):
    """fp16 on a GPU: when GradScaler skips optimizer.step(), the example's callback (Trainer runs it after
    every optimizer step) puts w back exactly. Here the skip is simulated: first_step, then the event."""
    ex = example("hf_trainer")
    model = ex["tiny_bert"]()
    opt = hf_opt("sam", model.parameters())
    trainer = ex["SAMTrainer"](model=model, args=ex["arguments"](str(tmp_path), 1), optimizers=(opt, None))
    w = weights(model)
    model(**stack(ex["token_data"](n=4))).loss.backward()
    opt.first_step(zero_grad=True)
    assert not all(torch.equal(u, v) for u, v in zip(weights(model), w))
    trainer.callback_handler.on_optimizer_step(trainer.args, trainer.state, trainer.control)
    assert_bitwise(weights(model), w)
    assert opt._w is None and opt.steps == 0


def test_fisher_takes_hf_dict_batches_with_padding():
    """update_mask on HF batches as they come (a dict of input_ids, attention_mask with right padding, labels;
    the model returns a ModelOutput): the mask equals the top half of a Fisher computed here sample by sample,
    each sample cut to its own length (its attention_mask) and run alone. float64."""
    ex = example("hf_trainer")
    data = ex["token_data"](n=12)
    model = ex["tiny_bert"]().double()
    opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, sparsity=0.5, num_samples=10, lr=0.1)
    batches = [stack(data[:8]), stack(data[8:])]
    assert (batches[0]["attention_mask"] == 0).any()  # padding in the batch
    opt.update_mask(model, batches)
    params = [p for p in model.parameters()]
    fisher = [torch.zeros_like(p) for p in params]
    for s in data[:10]:
        n = int(s["attention_mask"].sum())
        loss = model(input_ids=s["input_ids"][None, :n], labels=s["labels"][None]).loss
        for f, g in zip(fisher, torch.autograd.grad(loss, params, allow_unused=True)):
            f += 0 if g is None else g**2
    flat = torch.cat([f.flatten() for f in fisher])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(round(0.5 * len(flat))).indices] = True
    assert torch.equal(torch.cat([m.flatten() for m in opt.masks()]), keep)


# ---- bad input -----------------------------------------------------------------------------------------
def test_ddp_wrapper_refused_where_the_inner_model_is_needed(tmp_path):
    """update_mask runs one backward per sample: through DistributedDataParallel each would all-reduce. The
    wrapper is refused with a ValueError naming model.module; the inner model works. frozen_bn_stats takes
    either (it only walks the modules)."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1
    )
    try:
        model = mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = make_opt("ssamf", model.parameters())
        with pytest.raises(ValueError, match="model.module"):
            opt.update_mask(ddp, [batch(0)])
        assert opt.last_mask_update == -1  # nothing half-applied
        opt.update_mask(ddp.module, [batch(0)])
        with ssam.frozen_bn_stats(ddp):
            pass
    finally:
        torch.distributed.destroy_process_group()


def test_step_without_closure_needs_first_step():
    """SAM.step() without a closure is the second step (scaler.step, Trainer, accelerate); unperturbed, it is
    the old mistake of a plain optimizer's loop: a ValueError, nothing changed."""
    model = mlp()
    opt = make_opt("sam", model.parameters())
    F.cross_entropy(model(batch(0)[0]), batch(0)[1]).backward()
    w = weights(model)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    assert_bitwise(weights(model), w)
    assert opt.steps == 0 and opt._w is None


def _ddp_overflow_worker(rank, world, init_file, result_file):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        model = mlp()  # the same seed-0 weights on both processes
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = make_opt("sam", model.parameters())
        out = []
        for s, bad in enumerate([1, None]):  # step 0: pass 1 is NaN on process 1 only
            w, (x, y) = weights(model), batch(10 * s + rank)
            with ddp.no_sync():  # the local ascent of train.py and examples/accelerate_loop.py
                loss = F.cross_entropy(ddp(x), y)
                (loss * float("nan") if rank == bad else loss).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(ddp(x), y).backward()  # all-reduced
            opt.step()  # as Trainer and accelerate call it
            opt.zero_grad()
            out.append((all(torch.equal(u, v) for u, v in zip(weights(model), w)), opt.steps, weights(model)))
        torch.save(out, f"{result_file}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_overflow_in_one_process_skips_the_step_in_all(tmp_path):
    """Two processes (gloo), the ascent local (no_sync): a NaN in process 1's pass 1 makes step() skip the
    base step in BOTH processes (one all-reduced decision): their weights stay equal; the next step runs."""
    args = (2, tmp_path / "init", tmp_path / "out")  # fork: the children skip re-importing torch
    torch.multiprocessing.start_processes(_ddp_overflow_worker, args=args, nprocs=2, start_method="fork")
    r0, r1 = (torch.load(f"{tmp_path / 'out'}.{r}") for r in range(2))
    assert (
        [(same, steps) for same, steps, _ in r0]
        == [(same, steps) for same, steps, _ in r1]
        == [
            (True, 0),
            (False, 1),
        ]
    )
    assert_bitwise(r0[1][2], r1[1][2])


# ---- a due SSAM-D update, Lightning 16-mixed, HF accumulation, HF batches, the warning's line -------------
def test_gradscaler_inf_in_pass_1_leaves_a_due_ssamd_update_to_the_next_finite_step():
    """SSAM-D's update is due at step 2 (interval 2), and pass 1 of step 2 overflows: the update is not spent
    (masks, last_mask_update, the generator as they were) and happens at step 3, the next finite one: the fp32
    loop that leaves step 2 out, bit for bit, masks included."""
    sam_step = example("amp")["sam_step"]
    b = InfAt(mlp(), calls={4})  # step 2's pass 1
    ob, a = make_opt("ssamd", b.parameters()), mlp()
    oa = make_opt("ssamd", a.parameters())
    scaler = fixed_scaler()
    for s in (0, 1):
        sam_step(b, ob, scaler, *batch(s))
        plain_step(a, oa, *batch(s))
    masks, gen = [m.clone() for m in ob.masks()], ob.generator.get_state()
    assert ob.mask_update_due and ob.last_mask_update == 0
    sam_step(b, ob, scaler, *batch(2))
    assert ob.steps == 2 and scaler.get_scale() == 2.0**11 and ob.last_mask_update == 0
    assert all(torch.equal(m, k) for m, k in zip(ob.masks(), masks))
    assert torch.equal(ob.generator.get_state(), gen)
    sam_step(b, ob, scaler, *batch(3))
    plain_step(a, oa, *batch(3))
    assert ob.last_mask_update == oa.last_mask_update == 2 and ob.steps == 3
    assert all(torch.equal(m, k) for m, k in zip(ob.masks(), oa.masks()))
    assert not all(torch.equal(m, k) for m, k in zip(ob.masks(), masks))  # the update did happen
    assert_bitwise(weights(b), weights(a))


@pytest.mark.parametrize("kind", ["ssamd", "looksam"])
@pytest.mark.parametrize("bad_pass", [None, 1, 2])
def test_lightning_16_mixed_with_a_gradscaler(tmp_path, bad_pass, kind):
    """Lightning's MixedPrecision("16-mixed") with a real GradScaler (fixed scale) on the CPU, the example's
    module: Lightning runs the closure itself, then scaler.step(opt). It equals examples/amp.py's loop under
    the same fp16 autocast and scale bit for bit (that loop equals fp32 at a fixed scale where autocast is
    off); an inf in either pass of step 1 skips that step (w exact), halves the scale, and training goes on.
    LookSAM-2: step 1 has no ascent (one pass), so the second bad pass is step 2's first; the same holds."""
    import lightning as L
    from lightning.pytorch.plugins import MixedPrecision

    SAMModule, sam_step = example("lightning_loop")["SAMModule"], example("amp")["sam_step"]
    bad = set() if bad_pass is None else {2 + bad_pass - 1}
    module = SAMModule(lambda ps: make_opt(kind, ps))
    module.net = InfAt(mlp(), bad)
    ref = InfAt(mlp(), bad)
    oref, sref = make_opt(kind, ref.parameters()), fixed_scaler()
    batches = [batch(s) for s in range(3)]
    for x, y in batches:
        sam_step(ref, oref, sref, x, y, torch.autocast("cpu", dtype=torch.float16))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*map(torch.cat, zip(*batches))), batch_size=16
    )
    scaler = fixed_scaler()
    quiet = dict(
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False
    )
    plugin = MixedPrecision("16-mixed", "cpu", scaler)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, plugins=[plugin], **quiet)
    trainer.fit(module, loader)
    sam = trainer.optimizers[0]
    assert sam.steps == oref.steps == (3 if bad_pass is None else 2) and sam._w is None
    assert scaler.get_scale() == sref.get_scale() == (2.0**12 if bad_pass is None else 2.0**11)
    assert_bitwise(weights(module.net), weights(ref))


def test_hf_trainer_refuses_gradient_accumulation_on_the_first_micro_batch(tmp_path):
    """gradient_accumulation_steps=2: Trainer would hand the example's training_step one micro-batch at a
    time. Refused on the first one, naming gradient_accumulation_steps; the weights are w, nothing counted."""
    ex = example("hf_trainer")
    model = ex["tiny_bert"]()
    opt = hf_opt("sam", model.parameters())
    w = weights(model)
    args = ex["arguments"](str(tmp_path), 2, gradient_accumulation_steps=2)
    trainer = ex["SAMTrainer"](
        model=model, args=args, train_dataset=ex["token_data"](), optimizers=(opt, None)
    )
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        trainer.train()
    assert_bitwise(weights(model), w)
    assert opt._w is None and opt.steps == 0


def test_fisher_takes_a_batch_encoding():
    """DataCollatorWithPadding returns a transformers.BatchEncoding (a UserDict, not a dict): update_mask
    takes it as the dict it wraps, the same mask."""
    import transformers

    ex = example("hf_trainer")
    batch_ = stack(ex["token_data"](n=8))
    model = ex["tiny_bert"]().double()
    masks = []
    for b in (batch_, transformers.BatchEncoding(batch_)):
        opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, sparsity=0.5, num_samples=8, lr=0.1)
        opt.update_mask(model, [b])
        masks.append(opt.masks())
    assert all(torch.equal(u, v) for u, v in zip(*masks))


def test_the_davda54_warning_points_at_the_callers_line():
    """The warning for a state_dict without SSAM's entries names the line that called load_state_dict."""
    sam = make_opt("sam", mlp().parameters())
    davda = {"state": {}, "param_groups": [dict(sam.param_groups[0], params=[0, 1, 2, 3])]}
    with pytest.warns(UserWarning, match="no base-optimizer state") as record:
        sam.load_state_dict(davda)
        line = inspect.currentframe().f_lineno - 1
    assert (record[0].filename, record[0].lineno) == (__file__, line)
