"""Train SGD, SAM, SSAM-F or SSAM-D on CIFAR-10/100 or ImageNet-1K (Mi et al., NeurIPS 2022, Tables 1-3).

One device (CUDA if present, else CPU):
    python train.py                        # wrn10-1 on the 5,000-image subset in data/
    python train.py --demo                 # SGD, SAM, SSAM-F, SSAM-D, + a cheap SSAM-F (make demo)
    python train.py --preset cifar10-resnet18 --optimizer ssamf --sparsity 0.5
    python train.py --preset cifar100-wrn28-10 --optimizer ssamd --sparsity 0.9 --data-dir data/cifar100
    python train.py --preset cifar10-resnet18 --data-dir /tmp/cifar10  # <dir>/{train,test}/<class>/*.jpg
    python train.py --preset cifar10-resnet18 --optimizer sam --resume  # continue runs/<name> (ckpt.pt)
One node, 8 GPUs (--batch-size is the global batch, split over the processes):
    torchrun --standalone --nproc_per_node 8 train.py --preset imagenet-resnet50 --optimizer ssamd \
        --data-dir /data/imagenet
Two nodes, 8 GPUs each (run on both, --node_rank 0 on the first and 1 on the second; its address in
--master_addr):
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29500 \
        train.py --preset imagenet-resnet50
CPU processes (gloo) work the same way: torchrun --standalone --nproc_per_node 2 train.py --device cpu
FSDP2 instead of DDP (each process holds 1/N of the weights, gradients, SAM's copy, masks, momentum):
    torchrun --standalone --nproc_per_node 8 train.py --preset imagenet-resnet50 --fsdp --sync-ascent

Every preset value can be overridden by its flag (python train.py --help). The resolved config is printed
at the start. Output goes to --out-dir (default runs/<name>): metrics.jsonl (one line an epoch),
ckpt.pt (written atomically every epoch), final.json (only once the run has finished) and, while a run
writes there, lock. A run that diverges (NaN/inf loss or weights) stops with exit status 1.

Read top to bottom: arguments -> config (lab/config.py) -> data (lab/data.py) -> model (lab/models.py) ->
optimizer (ssam.py) -> the step -> the loop -> results (lab/runs.py: checkpoints, logs). --demo: lab/demo.py.
"""

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import lab.data
import lab.demo
import ssam
from lab import config
from lab.config import MOMENTUM, Config, resolve_config, same_run
from lab.data import DATASETS
from lab.models import make_model, samon
from lab.runs import (
    console,
    counters,
    load_shards,
    out_dir_lock,
    read_checkpoint,
    read_log,
    save_checkpoint,
    sharded_state,
    write_atomic,
)

ROOT = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------------------------------------
# Arguments -> config (lab/config.py: the one Config, the presets, every check)
# -----------------------------------------------------------------------------------------------------------
def get_args(argv=None):
    demo = "train SGD, SAM, SSAM-F, SSAM-D and cost-aware SSAM-F 0.9 on the preset (lab/demo.py)"
    return config.get_args(argv, __doc__, demo)


# -----------------------------------------------------------------------------------------------------------
# Devices: one process, or one of torchrun's
# -----------------------------------------------------------------------------------------------------------
def setup_distributed(c):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    dev = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {dev}: no CUDA device here; pass --device cpu")
    if c.compile and not dev.startswith("cuda") and not shutil.which(os.environ.get("CXX", "g++")):
        raise SystemExit(
            f"--compile on the CPU needs a C++ compiler ({os.environ.get('CXX', 'g++')}, or set CXX); "
            f"install one or drop --compile"
        )
    if "RANK" not in os.environ:
        if c.fsdp:
            raise SystemExit("--fsdp shards over torchrun's processes: run under torchrun (1 process works)")
        return torch.device(dev), 0, 1
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if ":" in dev:
        raise SystemExit(
            f"--device {dev}: under torchrun each process uses cuda:<LOCAL_RANK>; pass --device cuda"
        )
    cuda = dev.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if c.batch_size % world:
        raise SystemExit(f"--batch-size {c.batch_size} must be divisible by the {world} processes")
    return torch.device(f"cuda:{local}" if cuda else "cpu"), rank, world


# -----------------------------------------------------------------------------------------------------------
# Model (lab/models.py), and the one place that wraps it for several processes
# -----------------------------------------------------------------------------------------------------------
def build_model(c, num_classes, device):
    """The bare model on the device: what the optimizer, the checkpoint and SSAM-F's Fisher pass see."""
    model = make_model(c.model, num_classes, small_images=DATASETS[c.dataset]["side"] == 32).to(device)
    if c.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if c.sparse_ascent and c.compile:
        raise SystemExit(
            "--sparse-ascent with --compile: torch.compile hides the nn.Linear layers it patches; drop one"
        )
    if c.sparse_ascent and not any(
        isinstance(m, nn.Linear) and m.out_features % 4 == 0 for m in model.modules()
    ):
        raise SystemExit(
            f"--sparse-ascent: --model {c.model} has no nn.Linear with a multiple of 4 outputs, so no 2:4 "
            "mask fits a layer it could change; drop --sparse-ascent"
        )
    return model


def wrap_model(c, model, device, world):
    """The model the steps run: FSDP2 (--fsdp: in place, so the bare model is sharded too) or DDP over the
    processes (world > 1), then torch.compile (--compile)."""
    if c.fsdp:
        shard_model(model)
    elif world > 1:  # tensor masks / SAM-ON skip tensors in a synchronized ascent pass: DDP must be told
        unused = c.sync_ascent and (c.optimizer == "samon" or c.structure == "tensor")
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=unused
        )
    return torch.compile(model) if c.compile else model


def shard_model(model):
    """FSDP2: each Conv2d / Linear is a unit (all-gathered when it runs, then freed); BatchNorm and the rest
    go with the root. Parameters become DTensors: build the optimizer after this."""
    for m in model.modules():
        if m is not model and isinstance(m, (nn.Conv2d, nn.Linear)):
            fully_shard(m)
    fully_shard(model)


# -----------------------------------------------------------------------------------------------------------
# Optimizer (ssam.py) and schedule: SGD momentum 0.9 under every method, cosine LR over all steps
# -----------------------------------------------------------------------------------------------------------
def make_optimizer(c, model, steps_per_epoch):
    """The run's optimizer for `model` (c: the run's Config)."""
    sgd = dict(lr=c.lr, momentum=MOMENTUM, weight_decay=c.weight_decay)
    if c.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), **sgd)
    sgd.update(ascent_every=c.ascent_every, looksam_alpha=c.looksam_alpha)  # SAM-k, LookSAM-k: ssam.SAM
    if c.optimizer == "sam":
        return ssam.SAM(model.parameters(), torch.optim.SGD, rho=c.rho, adaptive=c.adaptive, **sgd)
    if c.optimizer == "samon":
        return samon(model, torch.optim.SGD, rho=c.rho, **sgd)
    masks = dict(
        sparsity=c.sparsity,
        update_interval=c.update_interval or steps_per_epoch,
        structure=None if c.structure == "unstructured" else c.structure,
        costs=None,
    )
    if c.mask_select == "cost":  # each tensor's ascent cost, from one forward
        side = DATASETS[c.dataset]["side"]
        masks["costs"] = ssam.ascent_costs(
            model, torch.zeros(2, 3, side, side, device=next(model.parameters()).device)
        )
    if c.optimizer == "ssamf":
        return ssam.SSAMF(
            model.parameters(), torch.optim.SGD, rho=c.rho, num_samples=c.num_samples, **masks, **sgd
        )
    total_steps = c.epochs * steps_per_epoch
    return ssam.SSAMD(
        model.parameters(),
        torch.optim.SGD,
        rho=c.rho,
        drop_rate=c.drop_rate,
        total_steps=total_steps,
        seed=c.seed,
        **masks,
        **sgd,
    )


def make_schedule(opt, total_steps):
    """Cosine decay to 0, on SAM's base optimizer: the same param_groups, and no warning that opt.step() is
    never called."""
    base = getattr(opt, "base_optimizer", opt)
    return torch.optim.lr_scheduler.LambdaLR(base, lambda t: 0.5 * (1 + math.cos(math.pi * t / total_steps)))


# -----------------------------------------------------------------------------------------------------------
# One training step. SAM-type: ascent pass, w + e, descent pass with BN statistics frozen, restore, SGD step.
# -----------------------------------------------------------------------------------------------------------
def train_step(
    model, opt, x, y, autocast, scaler=None, sync_ascent=False, sparse_ascent=False, ascent_fraction=1.0
):
    """Returns (loss, logits) of the unperturbed pass. `model` may be DDP-wrapped: the ascent pass then runs
    under no_sync() (no all-reduce) unless sync_ascent; the descent pass all-reduces as usual.
    ascent_fraction < 1: the ascent pass (and the returned loss, logits) sees only the first f of x (of each
    process's share under DDP); the descent pass sees all of x.

    fp16 (scaler given): the ascent gradient stays scaled, since eps = rho * g / ||g|| (and SSAM-D's ranking
    by |g|) do not depend on the scale; if it overflowed, ssam.py makes eps = 0. The descent gradient is
    unscaled by the scaler; if it holds inf/NaN, the step is skipped: second_step still restores w exactly,
    but with all gradients set to None, SGD leaves every parameter alone (no decay, no momentum). DDP
    all-reduced that gradient, so every process skips together. Then the scaler lowers its scale.

    A step between two ascents (opt.ascent_due False: --ascent-every k, SAM-k or LookSAM-k) is SGD's: one pass
    at w on all of x, then opt.step() (the base step, with LookSAM's g_v added)."""
    if not isinstance(opt, ssam.SAM) or not opt.ascent_due:
        with autocast:
            out = model(x)
            loss = F.cross_entropy(out, y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), out.detach()
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    ascent = opt.ascent_pass() if hasattr(opt, "ascent_pass") else contextlib.nullcontext()  # tensor masks
    k = max(1, round(ascent_fraction * len(y)))  # eps only needs a direction: a sub-batch gives one
    sparse = ssam.sparse_ascent(model, opt) if sparse_ascent else contextlib.nullcontext()  # dX = dY (W ⊙ M)
    with model.no_sync() if ddp and not sync_ascent else contextlib.nullcontext(), ascent, sparse:
        with autocast:
            out = model(x[:k])
            loss = F.cross_entropy(out, y[:k])
        (loss if scaler is None else scaler.scale(loss)).backward()
    opt.first_step(zero_grad=True)  # w <- w + eps (SSAM-D may draw a new mask in here)
    try:
        with ssam.frozen_bn_stats(model):  # BN running statistics follow the first pass only
            with autocast:
                loss2 = F.cross_entropy(model(x), y)
            (loss2 if scaler is None else scaler.scale(loss2)).backward()
    except BaseException:  # Ctrl-C, OOM...: never leave (or checkpoint) w + eps
        opt.restore()
        raise
    if scaler is not None:
        scaler.unscale_(opt.base_optimizer)
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not torch.isfinite(torch.stack([gr.norm() for gr in grads]).sum()):
            opt.zero_grad(set_to_none=True)  # skipped step: second_step below only restores w
    opt.second_step(zero_grad=True)  # w back exactly, then SGD with the gradient at w + eps
    if scaler is not None:
        scaler.update()
    return loss.detach(), out.detach()


def fingerprint(model, opt):
    """Per-tensor float64 sums of parameters and masks: equal across processes iff they are in sync. (BN
    running statistics are left out: DDP copies rank 0's to every process at the start of each forward.)
    FSDP2 keeps one copy of each weight and mask entry (sharded), so what every process holds stands in: BN
    statistics (rank 0's, broadcast at the end of each epoch), the optimizer counters, SSAM-D's generator."""
    ts = list(model.parameters())
    ts += [s["mask"] for s in opt.state.values() if "mask" in s]
    if isinstance(ts[0], DTensor):
        ts = list(model.buffers()) + [torch.as_tensor(v, device=ts[0].device) for v in counters(opt).values()]
    return torch.stack(
        [t.detach().double().sum() for t in ts] + [t.detach().double().abs().sum() for t in ts]
    )


# -----------------------------------------------------------------------------------------------------------
# The run: set up data -> model -> optimizer, resume, train epoch after epoch, write the results
# -----------------------------------------------------------------------------------------------------------
class Diverged(SystemExit):
    """The training loss or the weights are not finite: the run stops (exit status 1) without a checkpoint."""


@dataclass
class Run:
    """What the steps of a run share."""

    c: Config
    device: torch.device
    rank: int
    world: int
    data: object  # lab.data.CifarOnDevice or ImageNetLoader
    raw_model: nn.Module  # the bare model: optimizer, checkpoint, Fisher pass
    model: nn.Module  # what the steps run (DDP, compiled)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    autocast: torch.autocast
    scaler: torch.amp.GradScaler | None  # fp16 only
    g: torch.Generator  # data order, augmentation, Fisher images: all from here (CPU)

    @property
    def master(self):
        return self.rank == 0

    @property
    def out_dir(self):
        return Path(self.c.out_dir)


def train(c, show_config=True):
    """Train one run (c: its Config, from resolve_config); returns the final metrics dict (rank 0)."""
    device, rank, world = setup_distributed(c)
    out_dir = Path(c.out_dir)
    if rank == 0 and show_config:
        table = Table(
            "key", "value", title=f"config ({world} process{'es' if world > 1 else ''} on {device})"
        )
        for k, v in asdict(c).items():
            table.add_row(k, str(v))
        console.print(table)
    if (out_dir / "ckpt.pt").exists() and not c.resume and not c.fresh:
        raise SystemExit(
            f"{out_dir / 'ckpt.pt'} exists: pass --resume to continue that run, or --fresh to start over"
        )
    done = finished(c, rank) if c.resume else None
    if done:
        return done
    with out_dir_lock(out_dir) if rank == 0 else contextlib.nullcontext():
        if rank == 0 and c.fresh:  # start over: nothing of an earlier run may be mixed in
            for f in ("ckpt.pt", "metrics.jsonl", "final.json"):
                (out_dir / f).unlink(missing_ok=True)
            for d in out_dir.glob("ckpt-e*.dcp"):  # --fsdp's shards
                shutil.rmtree(d)
        torch.manual_seed(c.seed)
        run = set_up(c, device, rank, world)
        start_epoch, elapsed = resume(run) if c.resume else (0, 0.0)
        return train_epochs(run, start_epoch, elapsed)


def finished(c, rank):
    """--resume of a finished run (final.json of this config): its results, and nothing changes."""
    final_path = Path(c.out_dir) / "final.json"
    if not final_path.exists():
        return None
    try:
        done = json.loads(final_path.read_text())
    except ValueError:  # an unreadable final.json is remade
        return None
    same_run(done["config"], c, final_path)
    if rank == 0:
        console.print(
            f"{c.out_dir} is finished ({done['epochs']} epochs, test accuracy {done['test_acc']:.4f} in "
            f"{final_path}): nothing to do. Pass --fresh instead of --resume to train it again"
        )
    return done


def set_up(c, device, rank, world):
    """Data, model, optimizer and schedule, mixed precision, the data generator."""
    data = lab.data.load(c, device, rank, world)
    if c.optimizer == "ssamf" and c.num_samples > data.num_train:
        raise SystemExit(
            f"--num-samples {c.num_samples}: must be at most the {data.num_train} training images"
        )
    raw_model = build_model(c, data.num_classes, device)
    model = wrap_model(c, raw_model, device, world)
    opt = make_optimizer(c, raw_model, data.steps_per_epoch)
    sched = make_schedule(opt, c.epochs * data.steps_per_epoch)
    half = torch.bfloat16 if c.amp == "bf16" else torch.float16
    autocast = torch.autocast(device.type, dtype=half, enabled=c.amp != "none")
    scaler = torch.amp.GradScaler(device.type) if c.amp == "fp16" else None
    g = torch.Generator().manual_seed(c.seed)
    return Run(c, device, rank, world, data, raw_model, model, opt, sched, autocast, scaler, g)


def resume(run):
    """Everything back as the checkpoint has it, so the run continues bit-exactly. -> (epoch, elapsed s)."""
    path = run.out_dir / "ckpt.pt"
    if not path.exists():
        raise SystemExit(f"--resume: no checkpoint at {path}; drop --resume to start from scratch")
    ck = read_checkpoint(path, what="--resume: ")
    same_run(ck["config"], run.c, path)
    if ck.get("shards"):  # --fsdp: the weights and optimizer state are in a DCP folder
        load_shards(run, run.out_dir / ck["shards"])
    else:
        run.raw_model.load_state_dict(ck["model"])
        run.opt.load_state_dict(ck["optimizer"])
    run.sched.load_state_dict(ck["scheduler"])
    if run.scaler is not None:
        run.scaler.load_state_dict(ck["scaler"])
    run.g.set_state(ck["data_rng"])
    torch.set_rng_state(ck["torch_rng"])
    if run.device.type == "cuda" and ck.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ck["cuda_rng"], run.device)
    if hasattr(run.data, "epoch"):  # ImageNet's DistributedSampler: its epoch sets the order
        run.data.epoch = ck["epoch"]
    if run.master:
        console.print(f"resumed {run.out_dir / 'ckpt.pt'} at epoch {ck['epoch']}/{run.c.epochs}")
    return ck["epoch"], ck["elapsed"]


def train_epochs(run, start_epoch, elapsed):
    """The epochs from start_epoch on: each one logged and checkpointed; then the results (final.json)."""
    log_path = run.out_dir / "metrics.jsonl"
    if run.master:
        # keep only the epochs the checkpoint has (a crash between log line and checkpoint would repeat one)
        lines = read_log(log_path) if run.c.resume else []
        write_atomic(
            log_path, "".join(json.dumps(line) + "\n" for line in lines if line["epoch"] <= start_epoch)
        )
        (run.out_dir / "final.json").unlink(missing_ok=True)  # only a finished run has one
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    progress = Progress(*columns, console=console, disable=not run.master, transient=False)
    line, test_acc = None, float("nan")
    with progress:
        for epoch in range(start_epoch, run.c.epochs):
            line, test_acc, seconds = train_epoch(run, epoch, progress)
            elapsed += seconds
            if run.master:
                with open(log_path, "a") as f:
                    f.write(json.dumps(line) + "\n")
            if run.c.fsdp:  # every process writes its shards
                dcp.save(sharded_state(run), checkpoint_id=run.out_dir / f"ckpt-e{epoch + 1}.dcp")
            if run.master:
                save_checkpoint(run, epoch + 1, elapsed)
    # resumed after the last checkpoint but before final.json: nothing to train, just measure
    if line is None:
        test_acc = evaluate(run)
    return finish(run, line, test_acc, elapsed)


def step_totals(device):
    """What one_step adds up on the device (no sync per step): loss, non-finite steps, correct, seen."""
    return {
        k: torch.zeros((), device=device) for k in ("loss_sum", "loss_seen", "bad_steps", "correct", "seen")
    }


def train_epoch(run, epoch, progress):
    """One epoch: its steps, then the checks and (every --eval-every epochs) the test. -> (log line, test
    accuracy or None, seconds)."""
    c, steps = run.c, run.data.steps_per_epoch
    run.model.train()
    task = progress.add_task(f"epoch {epoch + 1}/{c.epochs}", total=steps, metrics="")
    tot = step_totals(run.device)
    t0, data_time, masks_updated = time.perf_counter(), 0.0, 0
    batches = run.data.batches(run.g)
    for step in range(steps):
        td = time.perf_counter()
        x, y = next(batches)
        if c.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        data_time += time.perf_counter() - td
        masks_updated += one_step(run, x, y, tot)
        if step % 10 == 0 or step == steps - 1:  # .item() syncs: not every step
            stop_if_diverged(run, epoch, step, tot["bad_steps"], end_of_epoch=False)
            if run.master:
                lr = run.sched.get_last_lr()[0]
                progress.update(task, completed=step + 1, metrics=f"{running(tot)} lr {lr:.4f}")
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.perf_counter() - t0
    if c.fsdp and run.world > 1:  # BN statistics: rank 0's everywhere (as DDP's broadcast_buffers)
        for b in run.raw_model.buffers():
            dist.broadcast(b, 0)
    stop_if_diverged(run, epoch, steps - 1, tot["bad_steps"], end_of_epoch=True)
    if run.world > 1:
        for t in tot.values():
            dist.all_reduce(t)
    last = epoch + 1 == c.epochs
    test_acc = evaluate(run) if last or (epoch + 1) % c.eval_every == 0 else None
    seconds = time.perf_counter() - t0
    line = dict(
        epoch=epoch + 1,
        loss=(tot["loss_sum"] / tot["loss_seen"]).item(),
        acc=(tot["correct"] / tot["seen"]).item(),
    )
    line |= dict(
        test_acc=test_acc, lr=run.sched.get_last_lr()[0], time=train_time, step_ms=1000 * train_time / steps
    )
    line |= dict(data_share=data_time / train_time, density=density(run.opt))
    # nonfinite_loss_steps, fp16: the steps GradScaler skipped
    line |= dict(masks_updated=masks_updated, nonfinite_loss_steps=int(tot["bad_steps"].item()))
    if run.world > 1:
        line["ranks_in_sync"] = ranks_in_sync(run, epoch)
    shown = f"loss {line['loss']:.3f} acc {line['acc']:.3f} " + (
        f"test {test_acc:.3f}" if test_acc is not None else ""
    )
    progress.update(
        task, metrics=shown + (f" density {line['density']:.3f}" if hasattr(run.opt, "density") else "")
    )
    return line, test_acc, seconds


def density(opt):
    """The share of the weights SSAM perturbs (its masks' density; 1 without masks)."""
    return opt.density() if hasattr(opt, "density") else 1.0


def running(tot):
    loss, acc = (tot["loss_sum"] / tot["loss_seen"]).item(), (tot["correct"] / tot["seen"]).item()
    return f"loss {loss:.3f} acc {acc:.3f}"


def one_step(run, x, y, tot):
    """SSAM's mask update when one is due, one training step, its loss and accuracy added to tot (on the
    device, no host sync). Returns the number of mask updates (0, 1)."""
    c, opt, updated = run.c, run.opt, 0
    if c.optimizer == "ssamf" and opt.mask_update_due and opt.ascent_due:  # a mask only for an ascent
        # Fisher (Eq. 5) on the bare model (no DDP hooks); ssam.py gives every process rank 0's mask. The
        # model is in train mode: each sample is normalized alone; running stats are not touched (ssam.py).
        opt.update_mask(run.raw_model, run.data.fisher_batches(run.g, c.num_samples))
        updated += 1
    mask_step = opt.last_mask_update if c.optimizer == "ssamd" else None
    loss, out = train_step(
        run.model, opt, x, y, run.autocast, run.scaler, c.sync_ascent, c.sparse_ascent, c.ascent_fraction
    )
    if c.optimizer == "ssamd" and opt.last_mask_update != mask_step:
        updated += 1  # SSAM-D drew a new mask in first_step (rank 0's, from its gradient)
    run.sched.step()
    finite = torch.isfinite(loss)  # counted on the device: no sync per step
    tot["bad_steps"] += ~finite
    # out: the unperturbed pass, on the first --ascent-fraction of y
    tot["loss_sum"] += torch.where(finite, loss * len(out), 0.0)
    tot["loss_seen"] += finite * len(out)
    tot["correct"] += (out.argmax(1) == y[: len(out)]).sum()
    tot["seen"] += len(out)
    return updated


def evaluate(run):
    """Test accuracy (all processes' shares of the test set together)."""
    run.model.eval()
    correct, n = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
    with torch.no_grad(), run.autocast:
        for x, y in run.data.test_batches():
            if run.c.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            correct += (run.model(x).argmax(1) == y).sum()
            n += len(y)
    if run.world > 1:
        dist.all_reduce(correct), dist.all_reduce(n)
    if run.c.fsdp:  # a forward without backward leaves the root unsharded: its parameters back to DTensors
        run.raw_model.reshard()
    run.model.train()
    return (correct / n).item()


def stop_if_diverged(run, epoch, step, bad_steps, end_of_epoch):
    """Ends the run (Diverged, exit status 1) before anything is written if the loss was not finite at some
    step (fp16: at every step of the epoch, since GradScaler skips a step whose loss overflowed and lowers
    its scale) or, at the end of the epoch, a weight or BN statistic is not finite. bad_steps counts the steps
    with a non-finite loss; summed over the processes so that all of them stop together. One host sync."""
    c, steps = run.c, run.data.steps_per_epoch
    bad = bad_steps.clone()
    if run.world > 1:
        dist.all_reduce(bad)
    limit = (run.world * steps - 1 if end_of_epoch else math.inf) if c.amp == "fp16" else 0
    flags = [bad > limit]
    if end_of_epoch:  # FSDP2: each process checks its shards
        weights = [t.to_local() if isinstance(t, DTensor) else t for t in run.raw_model.state_dict().values()]
        flags += [~torch.isfinite(t).all() for t in weights if t.is_floating_point()]
    stop = torch.stack(flags).any().int()
    if c.fsdp and run.world > 1:  # then all stop together
        dist.all_reduce(stop, dist.ReduceOp.MAX)
    if not stop.item():
        return
    what = "the loss is NaN or inf" if flags[0].item() else "a weight or BatchNorm statistic is NaN or inf"
    ckpt = run.out_dir / "ckpt.pt"  # a checkpoint is written after every good epoch
    kept = (
        f"{ckpt} (epoch {epoch}) is kept as the last good checkpoint"
        if epoch
        else "no checkpoint was written"
    )
    raise Diverged(
        f"training diverged in epoch {epoch + 1} (by step {step + 1} of {steps}): {what} "
        f"(--lr {c.lr:g}, now {run.sched.get_last_lr()[0]:.3g}). Stopped: {kept}, no final.json. "
        f"Lower --lr" + (" or --rho" if c.optimizer != "sgd" else "")
    )


def ranks_in_sync(run, epoch):
    """All processes must hold the same weights and masks, or something is broken."""
    mine = fingerprint(run.raw_model, run.opt)
    fps = [torch.zeros_like(mine) for _ in range(run.world)]
    dist.all_gather(fps, mine)
    if not all(torch.equal(fps[0], f) for f in fps):
        raise RuntimeError(f"processes diverged at epoch {epoch + 1}: weights or masks differ")
    return True


def finish(run, line, test_acc, elapsed):
    """The run's results, in final.json: train accuracy and ms/step over every epoch of the run (a resumed
    run's log holds the earlier ones too)."""
    history = read_log(run.out_dir / "metrics.jsonl") if run.master else [line] if line else []
    result = dict(
        config=asdict(run.c),
        test_acc=test_acc,
        train_acc=history[-1]["acc"] if history else None,
        epochs=run.c.epochs,
        time_s=elapsed,
        step_ms=float(np.median([h["step_ms"] for h in history])) if history else None,
        density=density(run.opt),
        processes=run.world,
        device=str(run.device),
        torch=torch.__version__,
    )
    if run.master:
        write_atomic(run.out_dir / "final.json", json.dumps(result, indent=2) + "\n")
        console.print(
            f"[bold]{run.c.name}[/]: test accuracy {test_acc:.4f}, {result['step_ms'] or 0:.0f} ms/step, "
            f"{elapsed:.0f} s -> {run.out_dir / 'final.json'}"
        )
    return result


if __name__ == "__main__":
    args = get_args()
    if args.demo:
        lab.demo.main(sys.argv[1:], sys.modules[__name__])
    else:
        train(resolve_config(args))
    if dist.is_initialized():
        dist.destroy_process_group()
