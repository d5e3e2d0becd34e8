"""One mask on every process: accelerate and Lightning strategy="ddp" on 2 gloo processes (CPU), the examples'
loops. Both processes train on the same batches, but SSAM-F's Fisher data and SSAM-D's seed differ by process:
every process must hold rank 0's mask after every update, and end on the weights of the one-process run with
rank 0's Fisher data or seed. One fork of 2 processes runs every check (`_worker`)."""

import functools
import os
import pathlib
import runpy
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import ssam

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
WORLD = 2
CHECKS = ["accelerate_ssamf", "accelerate_ssamd", "lightning_ssamf", "lightning_ssamd"]
CHECKS += ["own_masks", "mismatch"]


@functools.cache
def example(name):
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"examples.{name}")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)).double()


def data(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def make_opt(kind, params, seed):
    """seed: the global seed SSAM-D's seed=None draws its generator's seed from (each process its own)."""
    torch.manual_seed(seed)
    kw = dict(rho=0.05, lr=0.1, momentum=0.9, update_interval=2)
    if kind == "ssamf":
        return ssam.SSAMF(params, torch.optim.SGD, num_samples=8, **kw)
    return ssam.SSAMD(params, torch.optim.SGD, total_steps=6, **kw)


def plain_step(model, opt, x, y, fisher):
    """The one-process oracle: README's loop, with rank 0's Fisher data."""
    if isinstance(opt, ssam.SSAMF) and opt.mask_update_due:
        opt.update_mask(model, fisher)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def gathered(masks):
    """Every process's masks, flat, as a list by rank."""
    flat = torch.cat([m.flatten() for m in masks]).to(torch.uint8)
    out = [torch.zeros_like(flat) for _ in range(WORLD)]
    dist.all_gather(out, flat)
    return out


def oracle(kind, batches, fisher0):
    model = mlp()
    opt = make_opt(kind, model.parameters(), seed=0)
    masks = []
    for x, y in batches:
        plain_step(model, opt, x, y, fisher0)
        masks.append(torch.cat([m.flatten() for m in opt.masks()]).to(torch.uint8))
    return model, masks


def check_accelerate(rank, kind):
    """examples/accelerate_loop.py, 2 micro-batches a step, each process its own Fisher data and seed."""
    batches = [data(s, n=32) for s in range(4)]
    fisher = [data(50 + rank, n=8)]
    net = mlp()
    sam = make_opt(kind, net.parameters(), seed=rank)
    step_masks = []
    real_first = sam.first_step

    def first_step(**kw):  # the masks each step perturbs with (SSAM-D: after its drop-and-grow)
        real_first(**kw)
        step_masks.append(gathered(sam.masks()))

    sam.first_step = first_step
    net = example("accelerate_loop")["train"](net, sam, batches, k=2, fisher=fisher)
    ref, ref_masks = oracle(kind, batches, [data(50, n=8)])
    for theirs, mine in zip(step_masks, ref_masks):
        assert all(torch.equal(t, mine) for t in theirs), "a process perturbs with a mask other than rank 0's"
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0)


def check_lightning(rank, kind, tmp):
    """examples/lightning_loop.py, strategy="ddp" (in torchrun's environment: Lightning launches nothing)."""
    import lightning as L

    SAMModule = example("lightning_loop")["SAMModule"]
    batches = [data(s) for s in range(4)]
    fisher = [data(50 + rank, n=8)]
    seen = []

    class Module(SAMModule):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            seen.append(gathered(self.optimizers().optimizer.masks()))

    module = Module(lambda ps: make_opt(kind, ps, seed=rank), fisher_data=fisher)
    module.net = mlp()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*map(torch.cat, zip(*batches))), 16)
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
    quiet |= dict(enable_checkpointing=False)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=WORLD, strategy="ddp", use_distributed_sampler=False,
        default_root_dir=tmp, **quiet,
    )  # fmt: skip
    trainer.fit(module, loader)
    ref, ref_masks = oracle(kind, batches, [data(50, n=8)])
    assert trainer.global_step == 4 and len(seen) == 4
    for theirs, mine in zip(seen, ref_masks):
        assert all(torch.equal(t, mine) for t in theirs), "a process holds a mask other than rank 0's"
    for p, q in zip(module.net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0)


def check_own_masks(rank):
    """process_group=False: each process keeps the mask it computed (here from its own Fisher data)."""
    net = mlp()
    opt = ssam.SSAMF(net.parameters(), torch.optim.SGD, num_samples=8, process_group=False, lr=0.1)
    opt.update_mask(net, [data(50 + rank, n=8)])
    theirs = gathered(opt.masks())
    assert not torch.equal(theirs[0], theirs[1])


def check_mismatch(rank):
    """Processes whose parameters differ in shape (pipeline stages...) under the default group: a ValueError
    on every process, naming process_group, no hang and no mask set."""
    net = nn.Linear(4, 2 + rank).double()
    opt = ssam.SSAMF(net.parameters(), torch.optim.SGD, num_samples=2, lr=0.1)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="process_group"):
        opt.update_mask(net, [(x, torch.zeros(2, dtype=torch.long))])
    assert opt.last_mask_update == -1 and not opt.state


def _worker(rank, tmp, port):
    torch.set_num_threads(1)
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank))
    os.environ.update(env, LOCAL_RANK=str(rank), NODE_RANK="0")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)  # accelerate and Lightning take this group
    runs = {
        "accelerate_ssamf": lambda: check_accelerate(rank, "ssamf"),
        "accelerate_ssamd": lambda: check_accelerate(rank, "ssamd"),
        "lightning_ssamf": lambda: check_lightning(rank, "ssamf", tmp),
        "lightning_ssamd": lambda: check_lightning(rank, "ssamd", tmp),
        "own_masks": lambda: check_own_masks(rank),
        "mismatch": lambda: check_mismatch(rank),
    }
    results = {}
    for name in CHECKS:
        try:
            runs[name]()
            results[name] = "ok"
        except BaseException:  # pytest.raises' Failed too
            results[name] = traceback.format_exc()
        dist.barrier()
    torch.save(results, f"{tmp}/results{rank}.pt")
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_process_holds_rank_0s_mask(tmp_path):
    args = (str(tmp_path), free_port())  # fork: the children skip re-importing torch and Lightning
    torch.multiprocessing.start_processes(_worker, args=args, nprocs=WORLD, start_method="fork")
    results = [torch.load(tmp_path / f"results{r}.pt") for r in range(WORLD)]
    failed = [f"{c} (rank {r}):\n{res[c]}" for c in CHECKS for r, res in enumerate(results) if res[c] != "ok"]
    assert not failed, "\n".join(failed)
