"""What a train.py run writes: checkpoints, the metrics log, the out-dir lock (lab/grid.py finds runs
again)."""

import contextlib
import json
import os
import socket
from pathlib import Path

import torch
from rich.console import Console

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
