"""What a train.py run writes and how runs are found again: checkpoints, the metrics log, the out-dir lock,
and the grid runner (one naming rule and one "done" rule for the demo, bench/accuracy.py and
scripts/reproduce.py)."""

import contextlib
import json
import os
import shlex
import socket
import subprocess
import time
from pathlib import Path

import torch
from rich.console import Console

from lab.config import RESUME_FREE, ROOT, config_diff, get_args, resolve_config

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


def load_checkpoint(path, cfg):
    """--resume: the checkpoint at path, which must hold a run of config cfg."""
    if not path.exists():
        raise SystemExit(f"--resume: no checkpoint at {path}; drop --resume to start from scratch")
    ck = read_checkpoint(path, what="--resume: ")
    diff = config_diff(ck["config"], cfg)
    if diff:
        raise SystemExit(
            f"--resume: {path} was made with a different config: {', '.join(diff)}. Use the same "
            f"flags, another --out-dir, or --fresh to start over"
        )
    return ck


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
# Grids of runs: ONE naming rule and ONE "done" rule for the demo, bench/accuracy.py and scripts/reproduce.py
# -----------------------------------------------------------------------------------------------------------
def grid_run(flags, root):
    """train.py flags (a list) -> the run's config, in <root>/<name>. The name comes from the config:
    <preset>-<optimizer>[-s<sparsity>]-seed<seed>, then every setting that differs from the preset's recipe,
    e.g. cifar10-resnet18-sgd-seed0-epochs1-train-size256; cfg["recipe"] is True when nothing differs."""
    args = get_args(flags)
    if args.name or args.out_dir or args.demo:
        raise ValueError(f"grid_run names the run itself: drop --name/--out-dir/--demo from {flags}")
    cfg = resolve_config(args)
    base = ["--preset", args.preset, "--optimizer", cfg["optimizer"], "--seed", str(cfg["seed"])]
    recipe = resolve_config(
        get_args(base + (["--sparsity", str(cfg["sparsity"])] if "sparsity" in cfg else []))
    )
    differ = [k for k in cfg if k not in RESUME_FREE and cfg[k] != recipe.get(k)]
    cfg["name"] = recipe["name"] + "".join(
        f"-{k.replace('_', '-')}" + ("" if cfg[k] is True else str(cfg[k]).replace(":", "of")) for k in differ
    )
    cfg["out_dir"] = str(Path(root) / cfg["name"])
    return cfg, not differ


def run_state(cfg):
    """'done' (final.json records this config), 'resume' (ckpt.pt of this config), 'todo' (neither), or
    'other: <diff>' when the folder holds a run of another config."""
    d = Path(cfg["out_dir"])
    if (d / "final.json").exists():
        diff = config_diff(json.loads((d / "final.json").read_text())["config"], cfg)
        return "done" if not diff else "other: " + ", ".join(diff)
    if (d / "ckpt.pt").exists():
        saved = read_checkpoint(d / "ckpt.pt", mmap=True)["config"]
        diff = config_diff(saved, cfg)
        return "resume" if not diff else "other: " + ", ".join(diff)
    return "todo"


def run_grid(grid, root, fresh=False, launch=None, jobs=1, env=None, dry_run=False, train_fn=None):
    """Train every run of `grid` (a list of train.py flag lists) that is not done; returns [(cfg, final)]
    in grid order (final = final.json, None on a dry run). A done run is reused, an interrupted one resumed;
    a folder holding another config is refused unless fresh (then it is trained again from scratch).
    launch=None trains in this process with train_fn (train.train), one run after another (the demo);
    otherwise each run is the command launch + [train.py, flags...] (e.g. [sys.executable] or torchrun ...),
    `jobs` at a time, its output in <out_dir>/train.log when jobs > 1."""
    plan = []
    for flags in grid:
        cfg, recipe = grid_run(flags, root)
        st = run_state(cfg)
        if st.startswith("other") and not fresh:
            raise SystemExit(
                f"{cfg['out_dir']} holds a run of another config ({st[7:]}): move it away, or pass "
                f"--fresh to train it again with the config asked for"
            )
        st = "todo" if fresh else st
        console.print(
            f"[{len(plan) + 1}/{len(grid)}] {st:6} {cfg['name']}" + ("" if recipe else "  (not the recipe)"),
            soft_wrap=True,
        )
        plan.append((flags, cfg, st))
    running = []

    def wait(until):  # reap finished subprocesses until len(running) <= until
        while len(running) > until:
            time.sleep(0.2)
            for item in [r for r in running if r[0].poll() is not None]:
                running.remove(item)
                proc, log, c = item
                if log:
                    log.close()
                if proc.returncode != 0:
                    for other, _, _ in running:
                        other.kill()
                    tail = (Path(c["out_dir"]) / "train.log").read_text()[-3000:] if log else ""
                    raise SystemExit(
                        f"{tail}\ntrain.py failed (exit {proc.returncode}) for {c['name']}: fix it "
                        f"and rerun (finished runs are kept)"
                    )
                console.print(f"finished {c['name']}", soft_wrap=True)

    for i, (flags, cfg, st) in enumerate(plan):
        if dry_run or st == "done":
            continue
        cfg["resume"], cfg["fresh"] = st == "resume", st != "resume"
        if launch is None:
            console.rule(f"[bold]{cfg['name']}")
            train_fn(cfg, show_config=i == 0)
            continue
        cmd = list(launch) + [
            str(ROOT / "train.py"),
            *flags,
            "--name",
            cfg["name"],
            "--out-dir",
            cfg["out_dir"],
            "--resume" if cfg["resume"] else "--fresh",
        ]
        console.print("   " + shlex.join(cmd), soft_wrap=True, markup=False)
        Path(cfg["out_dir"]).mkdir(parents=True, exist_ok=True)
        log = open(Path(cfg["out_dir"]) / "train.log", "w") if jobs > 1 else None
        running.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), log, cfg))
        wait(jobs - 1)
    wait(0)
    out = []
    for flags, cfg, st in plan:
        f = Path(cfg["out_dir"]) / "final.json"
        out.append((cfg, json.loads(f.read_text()) if f.exists() and not dry_run else None))
    return out
