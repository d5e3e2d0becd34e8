"""SAM / SSAM-F / SSAM-D under FSDP2: save and resume with torch.distributed.checkpoint (DCP), bit for bit.

    torchrun --nproc_per_node 2 examples/fsdp_checkpoint.py      # a tiny MLP, gloo on the CPU

torch's get_state_dict(model, opt) keeps an optimizer's "state" and "param_groups" only; SAM's state_dict()
holds two entries more, the base optimizer's state (momentum) and the counters (steps, SSAM-D's generator),
and SAM.load_state_dict without them warns that momentum starts from zero. So save the parts: the base
optimizer's state through get_optimizer_state_dict (sharded, by parameter name), every mask by parameter name
(sharded) and the counters. Before the first mask update (a fresh SSAM-F) all-False masks stand in, so the
template that dcp.load fills in has the same keys whenever the checkpoint was written; the masks are set only
if the checkpoint's counters say a mask update happened. DCP reshards: N processes' checkpoint loads on any
number of them.
"""

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

import ssam


def state(model, opt):
    """What dcp.save writes (dcp.save(state(model, opt), checkpoint_id=path)), and the template load fills."""
    names = {p: n for n, p in model.named_parameters()}
    masked = getattr(opt, "masked", [])  # SSAM: one mask a trainable parameter
    none = {p: torch.zeros_like(p, dtype=torch.bool) for p in masked if "mask" not in opt.state.get(p, {})}
    return dict(
        model=get_model_state_dict(model),
        optimizer=get_optimizer_state_dict(model, opt.base_optimizer),
        masks={names[p]: none[p] if p in none else opt.state[p]["mask"] for p in masked},
        counters=opt.state_dict()["counters"],
    )


def load(model, opt, path):
    """The checkpoint at `path` into this (sharded) model and its optimizer, built as for the saved run."""
    saved = state(model, opt)
    dcp.load(saved, checkpoint_id=path)  # in place, resharded to this run's processes
    set_model_state_dict(model, saved["model"])
    set_optimizer_state_dict(model, opt.base_optimizer, saved["optimizer"])
    for k, v in saved["counters"].items():
        if k == "generator":  # SSAM-D's
            opt.generator.set_state(v)
        else:
            setattr(opt, k, v)
    if opt.state_dict()["counters"].get("last_mask_update", -1) >= 0:  # a mask was saved
        names = {p: n for n, p in model.named_parameters()}
        opt.set_masks([saved["masks"][names[p]] for p in opt.masked], count_update=False)


def step(model, opt, x, y, fisher):
    if isinstance(opt, ssam.SSAMF) and opt.mask_update_due:
        opt.update_mask(model, fisher)  # the same samples on every process
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def main(path="/tmp/fsdp_checkpoint_example"):
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def build():
        torch.manual_seed(0)
        model = fully_shard(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)))
        opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, num_samples=8, update_interval=3, lr=0.1)
        return model, opt

    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(5)]
    fisher = [(torch.randn(8, 8, generator=torch.Generator().manual_seed(99)), torch.zeros(8, dtype=int))]
    model, opt = build()
    for i, (x, y) in enumerate(batches):
        if i == 2:
            dcp.save(state(model, opt), checkpoint_id=path)
        step(model, opt, x, y, fisher)
    resumed, ropt = build()
    load(resumed, ropt, path)
    for x, y in batches[2:]:
        step(resumed, ropt, x, y, fisher)
    same = all(
        torch.equal(p.to_local(), q.to_local()) for p, q in zip(model.parameters(), resumed.parameters())
    )
    if rank == 0:
        print(f"resumed at step 2 of 5, bit-exact: {same}, SAM steps {ropt.steps}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
