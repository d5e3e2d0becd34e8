"""What a train.py run writes: checkpoints (FSDP2's sharded by torch.distributed.checkpoint), the metrics
log, the out-dir lock (lab/grid.py finds runs again)."""

import contextlib
import json
import os
import shutil
import socket
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from rich.console import Console
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import ssam

console = Console(stderr=True)


# -----------------------------------------------------------------------------------------------------------
# Files: each is written atomically; checkpoints are read as data only (weights_only=True), so a file that
# someone handed over cannot run code when it is loaded.
# -----------------------------------------------------------------------------------------------------------
def write_atomic(path, data):
    """Write data (str: as text; anything else: torch.save) through a temporary file in the same folder: a
    crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            torch.save(data, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_checkpoint(path, mmap=False, what=""):
    """A train.py checkpoint -> its dict (tensors, numbers, strings, lists, dicts: nothing else loads). `what`
    starts the error message."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        ck["config"]
        return ck
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SystemExit(
            f"{what}{path} is unreadable or not a train.py checkpoint ({type(e).__name__}: {why}). "
            f"Delete it (or the run folder) to start over, or pass --fresh"
        ) from None


def read_log(path):
    """metrics.jsonl -> list of dicts. A cut last line (a kill or a full disk mid-write) is dropped."""
    lines = path.read_text().splitlines() if path.exists() else []
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise SystemExit(
                    f"{path}: line {i + 1} is not JSON ({line[:60]!r}): fix or delete that line"
                ) from None
            console.print(f"[yellow]warning:[/] {path}: dropped its cut last line {line[:60]!r}")
    return out


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def out_dir_lock(out_dir):
    """One run writes an out-dir at a time. <out-dir>/lock holds the writer's "host pid" and is removed when
    the run ends (error or not). A lock left by a killed run (same host, pid not alive) is stale and taken
    over; one from another host cannot be checked and refuses the run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock, host = out_dir / "lock", socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                other_host, _, pid = lock.read_text().partition(" ")
            except FileNotFoundError:  # released in between: try again
                continue
            if other_host == host and pid.isdigit() and not pid_alive(int(pid)):
                console.print(
                    f"[yellow]note:[/] removing the stale lock {lock} of process {pid} (no longer running)"
                )
                lock.unlink(missing_ok=True)
                continue
            who = f"process {pid} on {other_host}" if pid.isdigit() else "a run that is just starting"
            raise SystemExit(
                f"{out_dir} is in use by another train.py run ({who}; {lock}): wait for it to end, pass "
                f"another --out-dir, or delete {lock} if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{host} {os.getpid()}")
        break
    else:
        raise SystemExit(
            f"could not take the lock {lock}: another run keeps taking it; pass another --out-dir"
        )
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


# -----------------------------------------------------------------------------------------------------------
# A run's checkpoint (train.py's Run): ckpt.pt, and with --fsdp the sharded part in a DCP folder, which
# torch.distributed.checkpoint reshards on load: a run saved by N processes resumes on any number of them
# -----------------------------------------------------------------------------------------------------------
def save_checkpoint(run, epoch, elapsed):
    """ckpt.pt, atomically: the whole config (dataclasses.asdict) and every state the run continues from."""
    cuda, shards = run.device.type == "cuda", f"ckpt-e{epoch}.dcp" if run.c.fsdp else None
    state = dict(config=asdict(run.c), epoch=epoch, elapsed=elapsed, shards=shards)
    state |= dict(model=None if shards else run.raw_model.state_dict())
    state |= dict(optimizer=None if shards else run.opt.state_dict(), scheduler=run.sched.state_dict())
    state |= dict(
        scaler=run.scaler.state_dict() if run.scaler is not None else None, data_rng=run.g.get_state()
    )
    state |= dict(
        torch_rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state(run.device) if cuda else None
    )
    write_atomic(run.out_dir / "ckpt.pt", state)
    for old in run.out_dir.glob("ckpt-e*.dcp"):  # --fsdp: ckpt.pt names the new shards; the old ones go
        if old.name != shards:
            shutil.rmtree(old)


def sharded_state(run):
    """The sharded part of a --fsdp checkpoint, keyed by parameter name: weights and BN statistics, the base
    optimizer's state (momentum), SSAM's masks, the optimizer's counters (SSAM-D's generator)."""
    model, opt = run.raw_model, run.opt
    names = {p: n for n, p in model.named_parameters()}
    base = getattr(opt, "base_optimizer", opt)
    state = dict(model=get_model_state_dict(model), optimizer=get_optimizer_state_dict(model, base))
    masked = getattr(opt, "masked", [])  # SSAM: every mask, all False before the first update
    none = {p: torch.zeros_like(p, dtype=torch.bool) for p in masked if "mask" not in opt.state.get(p, {})}
    state["masks"] = {names[p]: opt.state[p]["mask"] if p not in none else none[p] for p in masked}
    state["counters"] = counters(opt)
    return state


def counters(opt):
    """SSAM's counters (steps, SSAM-D's generator state...) as its state_dict() has them; none for SGD."""
    return opt.state_dict()["counters"] if isinstance(opt, ssam.SAM) else {}


def load_shards(run, path):
    """sharded_state() back from a DCP folder, into this run's sharded model and optimizer."""
    model, opt = run.raw_model, run.opt
    state = sharded_state(run)  # the template DCP fills in (in place; other process counts: resharded)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, getattr(opt, "base_optimizer", opt), state["optimizer"])
    for k, v in state["counters"].items():  # as ssam's load_state_dict does
        getattr(opt, k).set_state(v) if isinstance(getattr(opt, k), torch.Generator) else setattr(opt, k, v)
    if state["counters"].get("last_mask_update", -1) >= 0:  # saved after a mask update: its masks
        names = {p: n for n, p in model.named_parameters()}
        opt.set_masks([state["masks"][names[p]] for p in opt.masked], count_update=False)
