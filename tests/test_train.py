"""Tests of train.py: augmentation, models, presets, data errors, checkpoints (kill -9 + resume is bit-exact),
fp16 step skipping, and DDP over gloo (weights and SSAM masks identical on both processes). CPU only."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ssam  # noqa: E402
import train  # noqa: E402

TINY = ["--model", "wrn10-1", "--batch-size", "32", "--train-size", "384"]   # 12 steps an epoch, ~0.1 s a step


def run_train(*args, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, **kw)


def cfg_for(argv):
    return train.resolve_config(train.get_args(argv))


# -------------------------------------------------------------------------------------------- data
def test_augment_is_a_crop_flip_and_cutout_of_the_input():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
    out = train.augment(x, g, cutout=0)
    assert torch.equal(out, train.augment(x, torch.Generator().manual_seed(1), cutout=0))     # reproducible
    assert not torch.equal(out, train.augment(x, torch.Generator().manual_seed(2), cutout=0))
    xp = train.normalize(torch.nn.functional.pad(x, (4, 4, 4, 4)))
    flips = 0
    for i in range(len(x)):   # every output image is one of the 81 shifts of the padded input, maybe mirrored
        hits = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
                if torch.equal(out[i], (xp[i, :, dy:dy + 32, dx:dx + 32].flip(-1) if f else xp[i, :, dy:dy + 32, dx:dx + 32]))]
        assert hits, f"image {i} is not a crop of its input"
        flips += hits[0][2]
    assert 10 < flips < 38                                                                      # p = 0.5

    cut = train.augment(x, torch.Generator().manual_seed(1), cutout=16)
    holes = (cut == 0).all(1) & ~(out == 0).all(1)                  # pixels zeroed by Cutout only
    n = holes.flatten(1).sum(1)
    assert 10 < (n > 0).sum() < 38                                  # p = 0.5
    assert n.max() <= 256 and n.max() >= 64                         # at most 16x16, clipped at the borders
    assert torch.equal(cut[n == 0], out[n == 0])                    # otherwise the same draws as without Cutout


def test_subset_ships_and_is_class_balanced():
    tx, ty, vx, vy = train.load_subset()
    assert tx.shape == (5000, 3, 32, 32) and tx.dtype == torch.uint8 and vx.shape == (10000, 3, 32, 32)
    assert torch.equal(torch.bincount(ty), torch.full((10,), 500))
    assert torch.equal(torch.bincount(vy), torch.full((10,), 1000))            # the whole CIFAR-10 test split
    assert (ROOT / "data" / "cifar10_subset.npz").stat().st_size < 5e6
    mean = tx.float().mean((0, 2, 3))                               # real CIFAR-10 statistics, roughly
    assert torch.allclose(mean, torch.tensor([125.3, 123.0, 113.9]), atol=6)


def test_image_folder_tree_is_decoded_once_and_cached(tmp_path, monkeypatch):
    sx, sy, _, _ = train.load_subset()
    monkeypatch.setattr(train, "ROOT", tmp_path)                    # keep the cache out of the repo
    import numpy as np
    z = np.load(ROOT / "data" / "cifar10_subset.npz")
    tree = tmp_path / "tree"
    for split, per in (("train", 4), ("test", 2)):
        off, buf = z[f"{split}_offsets"], z[f"{split}_jpeg"]
        for i in [j for c in range(10) for j in range(c * len(off) // 10, c * len(off) // 10 + per)]:
            name = str(z[f"{split}_names"][i])
            (tree / split / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / split / name).write_bytes(buf[off[i]:off[i + 1]].tobytes())
    cfg = {"dataset": "cifar10", "data_dir": str(tree)}
    tx, ty, vx, vy = train.load_cifar(cfg)
    assert tx.shape == (40, 3, 32, 32) and torch.equal(torch.bincount(ty), torch.full((10,), 4)) and len(vy) == 20
    assert torch.equal(tx[:4], sx[:4]) and torch.equal(tx[4:8], sx[500:504])
    cache = list((tmp_path / "data" / "cache").glob("*.pt"))
    assert len(cache) == 1
    torch.save([t[:1] for t in (tx, ty, vx, vy)], cache[0])         # the second load reads the cache, not the JPEGs
    assert len(train.load_cifar(cfg)[0]) == 1


def test_clear_errors_for_bad_data_models_and_optimizers(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"")
    with pytest.raises(SystemExit, match="neither an ImageFolder tree"):
        train.load_cifar({"dataset": "cifar10", "data_dir": str(tmp_path / "flat")})
    (tmp_path / "half" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(SystemExit, match="test is missing"):
        train.load_cifar({"dataset": "cifar10", "data_dir": str(tmp_path / "half")})
    cfg = cfg_for(["--preset", "imagenet-resnet50", "--data-dir", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="train not found"):
        train.ImageNetLoader(cfg, torch.device("cpu"), 0, 1)
    with pytest.raises(SystemExit, match="unknown --model 'vgg16'"):
        train.make_model("vgg16", 10, True)
    with pytest.raises(SystemExit, match="unknown --optimizer 'adam'"):
        cfg_for(["--optimizer", "adam"])
    with pytest.raises(SystemExit, match="unknown --preset"):
        train.get_args(["--preset", "mnist"])
    r = run_train("--model", "resnet99")                            # a message, not a traceback
    assert r.returncode != 0 and "unknown --model 'resnet99'" in r.stderr and "Traceback" not in r.stderr


# -------------------------------------------------------------------------------------------- recipes
def test_presets_follow_the_paper():
    c = cfg_for(["--preset", "cifar100-resnet18", "--optimizer", "ssamf", "--sparsity", "0.9"])
    assert (c["epochs"], c["batch_size"], c["lr"], c["weight_decay"], c["rho"]) == (200, 128, 0.05, 1e-3, 0.2)
    assert c["num_samples"] == 128 and c["update_interval"] == 0 and c["cutout"] == 16
    assert cfg_for(["--preset", "cifar10-resnet18"])["weight_decay"] == 5e-4           # SGD
    assert cfg_for(["--preset", "cifar10-wrn28-10", "--optimizer", "sam"])["rho"] == 0.1
    c = cfg_for(["--preset", "imagenet-resnet50", "--optimizer", "ssamd", "--lr", "0.2"])
    assert (c["epochs"], c["batch_size"], c["lr"], c["weight_decay"], c["rho"]) == (90, 256, 0.2, 1e-4, 0.07)
    assert cfg_for(["--optimizer", "sam", "--weight-decay", "0.01"])["weight_decay"] == 0.01


def test_models():
    m = train.make_model("resnet18", 100, small_images=True)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    wrn = train.make_model("wrn28-10", 10, small_images=True)
    assert abs(sum(p.numel() for p in wrn.parameters()) / 1e6 - 36.48) < 0.05           # WRN-28-10: 36.5M
    assert train.make_model("wrn16-1", 10, True)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    r50 = train.make_model("resnet50", 1000, small_images=False)
    assert r50.conv1.kernel_size == (7, 7) and isinstance(r50.maxpool, nn.MaxPool2d)


# -------------------------------------------------------------------------------------------- steps
def test_fp16_step_with_inf_restores_weights_and_skips_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    autocast = torch.autocast("cpu", dtype=torch.float16)
    calls = []                                                      # inf in the 2nd (descent) backward only
    hook = model[0].weight.register_hook(lambda g: (calls.append(1), g * float("inf") if len(calls) == 2 else g)[1])
    w0 = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    train.train_step(model, opt, x, y, autocast, scaler)
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))                 # w restored, no step
    assert not opt.base_optimizer.state                                                  # no momentum started
    assert scaler.get_scale() == 512.0 and opt.steps == 1
    hook.remove()
    train.train_step(model, opt, x, y, autocast, scaler)
    assert not all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))             # a real step
    assert all(torch.isfinite(p).all() for p in model.parameters()) and scaler.get_scale() == 512.0


def test_second_pass_leaves_bn_running_stats_alone():
    torch.manual_seed(0)
    model = train.make_model("wrn10-1", 10, True)
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    ref = train.make_model("wrn10-1", 10, True)
    ref.load_state_dict(model.state_dict())
    ref(x)                                                          # one forward: what the stats should become
    train.train_step(model, opt, x, y, torch.autocast("cpu", enabled=False))
    assert torch.equal(model.bn.running_mean, ref.bn.running_mean)
    assert int(model.bn.num_batches_tracked) == 1


# -------------------------------------------------------------------------------------------- checkpoints
def test_kill9_mid_epoch_then_resume_is_bit_exact(tmp_path):
    args = [*TINY, "--epochs", "3", "--optimizer", "ssamd", "--update-interval", "5"]
    straight = run_train(*args, "--out-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    log = out / "metrics.jsonl"
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--out-dir", str(out)], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (out / "ckpt.pt").exists():                           # epoch 1 done and checkpointed (atomically)
        assert p.poll() is None and time.time() < deadline, p.stderr.read().decode()[-3000:]
        time.sleep(0.01)
    time.sleep(0.2 * json.loads(log.read_text().splitlines()[0])["time"])      # a few steps into epoch 2
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    assert log.read_text().count("\n") == 1, "the kill must land inside epoch 2"
    assert torch.load(out / "ckpt.pt", weights_only=False)["epoch"] == 1

    resumed = run_train(*args, "--out-dir", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(out / "ckpt.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ma = [s["mask"] for s in a["optimizer"]["state"].values()]
    mb = [s["mask"] for s in b["optimizer"]["state"].values()]
    assert len(ma) == len(mb) > 0 and all(torch.equal(x, y) for x, y in zip(ma, mb))
    assert a["optimizer"]["counters"]["last_mask_update"] == b["optimizer"]["counters"]["last_mask_update"] > 0
    assert [json.loads(l)["test_acc"] for l in log.read_text().splitlines()] == \
           [json.loads(l)["test_acc"] for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]


def test_crash_then_resume_in_process_is_bit_exact(tmp_path, monkeypatch):
    """SSAM-F (its Fisher images come from the data generator) crashing inside epoch 2, then --resume."""
    argv = [*TINY, "--train-size", "256", "--epochs", "2", "--optimizer", "ssamf", "--update-interval", "6",
            "--num-samples", "32"]
    a = train.train(cfg_for([*argv, "--out-dir", str(tmp_path / "a")]), show_config=False)
    real_step, calls = train.train_step, []

    def crashing_step(*args, **kw):
        calls.append(1)
        if len(calls) == 8 + 5:                                     # step 5 of epoch 2
            raise KeyboardInterrupt
        return real_step(*args, **kw)
    monkeypatch.setattr(train, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg_for([*argv, "--out-dir", str(tmp_path / "b")]), show_config=False)
    monkeypatch.setattr(train, "train_step", real_step)
    b = train.train(cfg_for([*argv, "--out-dir", str(tmp_path / "b"), "--resume"]), show_config=False)
    ca, cb = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in "ab")
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert a["test_acc"] == b["test_acc"] and ca["optimizer"]["counters"] == cb["optimizer"]["counters"]


def test_bad_checkpoints_are_errors_not_restarts(tmp_path):
    argv = [*TINY, "--epochs", "1", "--train-size", "64", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.train(cfg_for([*argv, "--resume"]), show_config=False)
    train.train(cfg_for(argv), show_config=False)
    ck = tmp_path / "ckpt.pt"
    with pytest.raises(SystemExit, match="pass --resume to continue that run, or --fresh"):
        train.train(cfg_for(argv), show_config=False)               # no silent overwrite either
    with pytest.raises(SystemExit, match=r"different config: lr=0.05 \(now 0.1\)"):
        train.train(cfg_for([*argv, "--lr", "0.1", "--resume"]), show_config=False)
    good = ck.read_bytes()
    ck.write_bytes(good[: len(good) // 2])                          # truncated, as by a full disk
    with pytest.raises(SystemExit, match="unreadable"):
        train.train(cfg_for([*argv, "--resume"]), show_config=False)
    assert ck.read_bytes() == good[: len(good) // 2]                # nothing was overwritten
    r = run_train(*argv[:-2], "--epochs", "1", "--out-dir", str(tmp_path), "--resume")
    assert r.returncode != 0 and "unreadable" in r.stderr and "Traceback" not in r.stderr   # a message on the CLI


# -------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for optimizer in ("ssamd", "ssamf"):
        torch.manual_seed(0)                                        # same initial weights on both processes
        model = train.make_model("wrn10-1", 10, True)
        ddp = nn.parallel.DistributedDataParallel(model)
        cfg = dict(optimizer=optimizer, lr=0.05, weight_decay=1e-3, rho=0.1, adaptive=False, sparsity=0.8,
                   structure="unstructured", update_interval=2, num_samples=16, drop_rate=0.5, epochs=1, seed=0)
        opt = train.make_optimizer(cfg, model, steps_per_epoch=8)
        g = torch.Generator().manual_seed(100 + rank)               # different data on each process
        local_masks_differed = False
        for step in range(5):
            x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
            before = opt.last_mask_update
            if optimizer == "ssamf" and opt.mask_update_due:
                opt.update_mask(model, [(x, y), (torch.randn(8, 3, 32, 32, generator=g), y)])
            train.train_step(ddp, opt, x, y, torch.autocast("cpu", enabled=False))
            if opt.last_mask_update != before:                      # a new mask: rank-local until broadcast
                flat = torch.cat([m.flatten() for m in opt.masks()]).to(torch.uint8)
                other = [torch.zeros_like(flat) for _ in range(world)]
                dist.all_gather(other, flat)
                local_masks_differed |= not torch.equal(other[0], other[1])
                train.broadcast_masks(opt)
        # BN running stats are not compared: DDP copies rank 0's at the start of each forward, so they lag
        results[optimizer] = dict(params=torch.cat([p.detach().flatten() for p in model.parameters()]),
                                  masks=torch.cat([m.flatten() for m in opt.masks()]).to(torch.uint8),
                                  differed=local_masks_differed, steps=opt.steps)
    torch.save(results, f"{result_file}.{rank}")
    dist.destroy_process_group()


def test_ddp_two_processes_keep_weights_and_masks_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in (0, 1))
    for o in ("ssamd", "ssamf"):
        assert r0[o]["steps"] == r1[o]["steps"] == 5
        assert r0[o]["differed"], f"{o}: the processes' own masks should differ (different data), or this proves nothing"
        assert torch.equal(r0[o]["params"], r1[o]["params"]), o
        assert torch.equal(r0[o]["masks"], r1[o]["masks"]), o
        assert 0.15 < r0[o]["masks"].float().mean() < 0.25          # density 1 - 0.8


def test_torchrun_two_cpu_processes_end_to_end(tmp_path):
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "train.py"), *TINY, "--epochs", "1", "--optimizer", "ssamd", "--update-interval", "3",
                        "--device", "cpu", "--out-dir", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads((out / "final.json").read_text())
    line = json.loads((out / "metrics.jsonl").read_text())
    assert final["processes"] == 2 and line["ranks_in_sync"] is True and line["masks_updated"] >= 3
    assert 0 <= final["test_acc"] <= 1


# -------------------------------------------------------------------------------------------- structured masks
def test_tensor_masks_and_samon_skip_ascent_gradients_in_train_step():
    """train_step wraps the first pass in opt.ascent_pass(): unperturbed tensors get no ascent gradient there,
    and the flags come back on for the descent pass."""
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for argv in (["--optimizer", "samon"], ["--optimizer", "ssamd", "--structure", "tensor", "--sparsity", "0.9"]):
        cfg = cfg_for(argv + TINY)
        torch.manual_seed(0)
        model = train.make_model("wrn10-1", 10, True)
        opt = train.make_optimizer(cfg, model, steps_per_epoch=12)
        frozen = list(opt._unperturbed)
        assert frozen and len(frozen) < len(list(model.parameters()))
        seen = []
        hooks = [p.register_hook(lambda g, p=p: seen.append(id(p))) for p in model.parameters()]
        w0 = [p.detach().clone() for p in model.parameters()]
        train.train_step(model, opt, x, y, torch.autocast("cpu", enabled=False))
        for h in hooks:
            h.remove()
        n = len(list(model.parameters()))
        ascent_ids = set(seen[: len(seen) - n])                    # the descent pass grads every parameter
        assert not ascent_ids & {id(p) for p in frozen}
        assert all(p.requires_grad for p in model.parameters())
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), w0))
