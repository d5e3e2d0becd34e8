"""Grids of train.py runs: ONE naming rule and ONE "done" rule for the demo, bench/accuracy.py and
scripts/reproduce.py. A run's name comes from its config (lab/config.run_name); it is done when its
final.json holds that config, resumed when its ckpt.pt does, and trained otherwise."""

import json
import shlex
import subprocess
import time
from pathlib import Path

from lab.config import ROOT, changes, config_diff, get_args, load_config, resolve_config
from lab.runs import console, read_checkpoint


def grid_run(flags, root):
    """train.py flags (a list) -> (the run's Config, in <root>/<name>; whether it is the preset's recipe:
    nothing but the sparsity differs from it)."""
    args = get_args(flags)
    if args.name or args.out_dir:
        raise ValueError(f"grid_run names the run itself: drop --name/--out-dir from {flags}")
    c = resolve_config(args)
    c.out_dir = str(Path(root) / c.name)
    return c, all(k == "sparsity" for k, _ in changes(c))


def run_state(c):
    """'done' (final.json holds this config), 'resume' (ckpt.pt of this config), 'todo' (neither), or
    'other: <diff>' when the folder holds a run of another config."""
    d = Path(c.out_dir)
    if (d / "final.json").exists():
        saved = json.loads((d / "final.json").read_text())["config"]
    elif (d / "ckpt.pt").exists():
        saved = read_checkpoint(d / "ckpt.pt", mmap=True)["config"]
    else:
        return "todo"
    diff = config_diff(load_config(saved, d), c)
    return ("done" if (d / "final.json").exists() else "resume") if not diff else "other: " + ", ".join(diff)


def plan(grid, root, fresh):
    """[(flags, Config, state)] of every run of the grid, each listed on the console."""
    out = []
    for flags in grid:
        c, recipe = grid_run(flags, root)
        st = run_state(c)
        if st.startswith("other") and not fresh:
            raise SystemExit(
                f"{c.out_dir} holds a run of another config ({st[7:]}): move it away, or pass "
                f"--fresh to train it again with the config asked for"
            )
        st = "todo" if fresh else st
        note = "" if recipe else "  (not the recipe)"
        console.print(f"[{len(out) + 1}/{len(grid)}] {st:6} {c.name}{note}", soft_wrap=True)
        out.append((flags, c, st))
    return out


def run_grid(grid, root, fresh=False, launch=None, jobs=1, env=None, dry_run=False, train_fn=None):
    """Train every run of `grid` (a list of train.py flag lists) that is not done; returns [(Config, final)]
    in grid order (final = final.json, None on a dry run). A done run is reused, an interrupted one resumed;
    a folder holding another config is refused unless fresh (then it is trained again from scratch).
    launch=None trains in this process with train_fn (train.train), one run after another (the demo);
    otherwise each run is the command launch + [train.py, flags...] (e.g. [sys.executable] or torchrun ...),
    `jobs` at a time, its output in <out_dir>/train.log when jobs > 1."""
    runs, running = plan(grid, root, fresh), []
    for i, (flags, c, st) in enumerate(runs):
        if dry_run or st == "done":
            continue
        c.resume, c.fresh = st == "resume", st != "resume"
        if launch is None:
            console.rule(f"[bold]{c.name}")
            train_fn(c, show_config=i == 0)
        else:
            running.append(start(launch, flags, c, jobs, env))
            wait(running, jobs - 1)
    wait(running, 0)
    out = []
    for _, c, _ in runs:
        f = Path(c.out_dir) / "final.json"
        out.append((c, json.loads(f.read_text()) if f.exists() and not dry_run else None))
    return out


def start(launch, flags, c, jobs, env):
    """Start train.py for run c as a subprocess -> (process, its log file or None, c)."""
    where = ["--name", c.name, "--out-dir", c.out_dir, "--resume" if c.resume else "--fresh"]
    cmd = [*launch, str(ROOT / "train.py"), *flags, *where]
    console.print("   " + shlex.join(cmd), soft_wrap=True, markup=False)
    Path(c.out_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(c.out_dir) / "train.log", "w") if jobs > 1 else None
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), log, c


def wait(running, until):
    """Reap finished subprocesses until at most `until` run; a failed one stops the others and the grid."""
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
                tail = (Path(c.out_dir) / "train.log").read_text()[-3000:] if log else ""
                raise SystemExit(
                    f"{tail}\ntrain.py failed (exit {proc.returncode}) for {c.name}: fix it and rerun "
                    "(finished runs are kept)"
                )
            console.print(f"finished {c.name}", soft_wrap=True)
