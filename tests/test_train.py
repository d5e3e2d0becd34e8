"""Tests of train.py: augmentation, models, presets, data errors, checkpoints (kill -9 + resume is bit-exact),
fp16 step skipping, and DDP over gloo (weights and SSAM masks identical on both processes). CPU only.
No wrong result with exit 0: divergence, bad numbers, ignored flags, ImageFolder classes, cache key
and location, unreadable files, the out-dir lock, cut log lines, finished runs. The CUDA paths on the CPU:
fp16 GradScaler steps, --compile, --channels-last."""

import dataclasses
import json
import math
import os
import re
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

import lab.config
import lab.data
import lab.demo
import lab.grid
import lab.models
import lab.runs
import ssam
import train
from lab.config import Config

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

TINY = ["--model", "wrn10-1", "--batch-size", "32", "--train-size", "384"]  # 12 steps an epoch, ~0.1 s a step


def run_train(*args, env=None, processes=1, **kw):
    """train.py in a subprocess, one-threaded; processes > 1: under torchrun on this machine (CPU, gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.run(
        [sys.executable, *(launch if processes > 1 else []), str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        **kw,
    )


def said(r):
    """stderr of a finished run with rich's line wrapping undone."""
    return " ".join(r.stderr.split())


def cfg_for(argv):
    return train.resolve_config(train.get_args(argv))


# -------------------------------------------------------------------------------------------- data
def test_data_seed_draws_another_training_part_and_another_label_noise():
    """--data-seed picks which --train-size images are kept and which labels --label-noise changes; 0 is the
    benches' draw, so the runs they made keep their data. Without either, it is refused, not ignored."""
    cpu = torch.device("cpu")

    def data(*flags):
        return lab.data.CifarOnDevice(cfg_for([*TINY, "--label-noise", "0.4", *flags]), cpu, 0, 1)

    d0, again, d1 = data(), data("--data-seed", "0"), data("--data-seed", "1")
    clean1 = lab.data.CifarOnDevice(cfg_for([*TINY, "--data-seed", "1"]), cpu, 0, 1)
    assert torch.equal(d0.train_x, again.train_x) and torch.equal(d0.train_y, again.train_y)
    assert len(d1.train_x) == len(d0.train_x) == 384
    kept0, kept1 = {x.numpy().tobytes() for x in d0.train_x}, {x.numpy().tobytes() for x in d1.train_x}
    assert len(kept0 & kept1) < 384 // 2  # another part of the 5,000 images (about 384 * 384 / 5000 shared)
    changed = d1.train_y != clean1.train_y
    assert torch.equal(d1.train_x, clean1.train_x) and changed.sum() == round(0.4 * 384)
    with pytest.raises(SystemExit, match="--data-seed would be ignored"):
        cfg_for(["--data-seed", "1"])


def test_augment_is_a_crop_flip_and_cutout_of_the_input():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
    out = lab.data.augment(x, g, cutout=0)
    assert torch.equal(out, lab.data.augment(x, torch.Generator().manual_seed(1), cutout=0))  # reproducible
    assert not torch.equal(out, lab.data.augment(x, torch.Generator().manual_seed(2), cutout=0))
    xp = lab.data.normalize(torch.nn.functional.pad(x, (4, 4, 4, 4)))
    flips = 0
    for i in range(len(x)):  # every output image is one of the 81 shifts of the padded input, maybe mirrored
        hits = [
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (0, 1)
            if torch.equal(
                out[i],
                (
                    xp[i, :, dy : dy + 32, dx : dx + 32].flip(-1)
                    if f
                    else xp[i, :, dy : dy + 32, dx : dx + 32]
                ),
            )
        ]
        assert hits, f"image {i} is not a crop of its input"
        flips += hits[0][2]
    assert 10 < flips < 38  # p = 0.5

    cut = lab.data.augment(x, torch.Generator().manual_seed(1), cutout=16)
    holes = (cut == 0).all(1) & ~(out == 0).all(1)  # pixels zeroed by Cutout only
    n = holes.flatten(1).sum(1)
    assert 10 < (n > 0).sum() < 38  # p = 0.5
    assert n.max() <= 256 and n.max() >= 64  # at most 16x16, clipped at the borders
    assert torch.equal(cut[n == 0], out[n == 0])  # otherwise the same draws as without Cutout


def test_subset_ships_and_is_class_balanced():
    tx, ty, vx, vy = lab.data.load_subset()
    assert tx.shape == (5000, 3, 32, 32) and tx.dtype == torch.uint8 and vx.shape == (10000, 3, 32, 32)
    assert torch.equal(torch.bincount(ty), torch.full((10,), 500))
    assert torch.equal(torch.bincount(vy), torch.full((10,), 1000))  # the whole CIFAR-10 test split
    assert (ROOT / "data" / "cifar10_subset.npz").stat().st_size < 5e6
    mean = tx.float().mean((0, 2, 3))  # real CIFAR-10 statistics, roughly
    assert torch.allclose(mean, torch.tensor([125.3, 123.0, 113.9]), atol=6)


def make_tree(root, per_class=(4, 2), classes=range(10)):
    """An ImageFolder tree <root>/{train,test}/<class>/*.jpg of real subset JPEGs, per_class a class."""
    import numpy as np

    z = np.load(ROOT / "data" / "cifar10_subset.npz")
    for split, per in zip(("train", "test"), per_class):
        off, buf, names = z[f"{split}_offsets"], z[f"{split}_jpeg"], z[f"{split}_names"]
        for c in classes:
            for j in range((c % 10) * (len(off) - 1) // 10, (c % 10) * (len(off) - 1) // 10 + per):
                f = root / split / f"c{c:03d}" / Path(str(names[j])).name
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(buf[off[j] : off[j + 1]].tobytes())
    return root


def test_image_folder_tree_is_decoded_once_and_cached_outside_the_repo(tmp_path, monkeypatch):
    sx, sy, _, _ = lab.data.load_subset()
    tree = make_tree(tmp_path / "tree")
    cfg = Config(dataset="cifar10", data_dir=str(tree), cache_dir=str(tmp_path / "cache"))
    tx, ty, vx, vy = lab.data.load_cifar(cfg)
    assert (
        tx.shape == (40, 3, 32, 32)
        and torch.equal(torch.bincount(ty), torch.full((10,), 4))
        and len(vy) == 20
    )
    assert torch.equal(tx[:4], sx[:4]) and torch.equal(tx[4:8], sx[500:504])
    cache = list((tmp_path / "cache").glob("*.pt"))
    assert len(cache) == 1
    torch.save([t[:1] for t in (tx, ty, vx, vy)], cache[0])  # the second load reads the cache, not the JPEGs
    assert len(lab.data.load_cifar(cfg)[0]) == 1
    # the default cache: $SSAM_CACHE_DIR, else $XDG_CACHE_HOME/ssam, else ~/.cache/ssam (never the repo)
    for k in ("SSAM_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert lab.data.cache_dir(Config()) == tmp_path / "home" / ".cache" / "ssam"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lab.data.cache_dir(Config()) == tmp_path / "xdg" / "ssam"
    monkeypatch.setenv("SSAM_CACHE_DIR", str(tmp_path / "env"))
    assert lab.data.cache_dir(Config()) == tmp_path / "env"
    assert (
        lab.data.cache_dir(cfg_for(["--dataset", "cifar10", "--cache-dir", str(tmp_path / "flag")]))
        == tmp_path / "flag"
    )
    lab.data.load_cifar(Config(dataset="cifar10", data_dir=str(tree)))
    assert len(list((tmp_path / "env").glob("*.pt"))) == 1 and not (ROOT / "data" / "cache").exists()


def test_cache_key_follows_the_files_and_their_labels(tmp_path):
    tree = make_tree(tmp_path / "tree")
    cfg = Config(dataset="cifar10", data_dir=str(tree), cache_dir=str(tmp_path / "cache"))
    tx, ty, _, _ = lab.data.load_cifar(cfg)
    a, b = sorted((tree / "train" / "c000").iterdir())[0], sorted((tree / "train" / "c001").iterdir())[0]
    img_b = tx[sorted((tree / "train").glob("*/*")).index(b)]
    a.rename(tree / "train" / "c001" / a.name)  # swap one image between two classes:
    b.rename(tree / "train" / "c000" / b.name)  # same counts, same file names
    tx2, ty2, _, _ = lab.data.load_cifar(cfg)
    assert not torch.equal(tx, tx2) and torch.equal(torch.bincount(ty2), torch.full((10,), 4))
    i = sorted((tree / "train").glob("*/*")).index(tree / "train" / "c000" / b.name)
    assert torch.equal(tx2[i], img_b) and ty2[i] == 0  # the moved image has its new label
    f = sorted((tree / "test" / "c005").iterdir())[0]
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # touched: decoded again
    lab.data.load_cifar(cfg)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3


def test_image_folder_errors_name_the_problem(tmp_path, capsys):
    for n, dataset in (
        (3, "cifar10"),
        (10, "cifar100"),
        (11, "cifar10"),
    ):  # class count checked before decoding
        tree = make_tree(tmp_path / f"t{n}", (1, 1), classes=range(n))
        with pytest.raises(
            SystemExit,
            match=f"has {n} class folders .* --dataset {dataset} has "
            f"{100 if dataset == 'cifar100' else 10} classes",
        ):
            lab.data.load_cifar(
                Config(dataset=dataset, data_dir=str(tree), cache_dir=str(tmp_path / "cache"))
            )
    tree = make_tree(tmp_path / "bad", (2, 1))
    good = sorted((tree / "train" / "c003").iterdir())[0]
    good.write_bytes(good.read_bytes()[:300])  # a truncated JPEG
    cfg = Config(dataset="cifar10", data_dir=str(tree), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(SystemExit, match=f"{good}: not a readable image"):
        lab.data.load_cifar(cfg)
    good.unlink()
    (tree / "test" / "c007" / "notes.txt").write_text("not an image")  # a stray non-image file
    with pytest.raises(SystemExit, match=f"{tree / 'test' / 'c007' / 'notes.txt'}: not a readable image"):
        lab.data.load_cifar(cfg)
    (tree / "test" / "c007" / "notes.txt").unlink()
    # the cache location cannot be written (its parent is a file): a warning, and the data come from memory
    (tmp_path / "file").write_text("")
    tx, ty, vx, vy = lab.data.load_cifar(dataclasses.replace(cfg, cache_dir=str(tmp_path / "file" / "cache")))
    assert len(tx) == 19 and len(vx) == 10
    assert "could not write the decoded cache" in capsys.readouterr().err
    r = run_train(
        "--dataset", "cifar10", "--data-dir", str(tmp_path / "t3"), "--cache-dir", str(tmp_path / "cache")
    )
    assert r.returncode != 0 and "has 3 class folders" in r.stderr and "Traceback" not in r.stderr
    # ImageNet reads its files in DataLoader workers: the error names the file there too
    (tree / "val").mkdir()
    for d in (tree / "test").iterdir():
        d.rename(tree / "val" / d.name)
    (tree / "train" / "c002" / "broken.JPEG").write_bytes(b"\xff\xd8\xff not really a jpeg")
    cfg = cfg_for(
        ["--preset", "imagenet-resnet50", "--data-dir", str(tree), "--batch-size", "20", "--workers", "0"]
    )
    loader = lab.data.ImageNetLoader(cfg, torch.device("cpu"), 0, 1)
    with pytest.raises(
        RuntimeError, match=f"{tree / 'train' / 'c002' / 'broken.JPEG'}: not a readable image"
    ):
        next(loader.batches(None))


def test_clear_errors_for_bad_data_models_and_optimizers(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"")
    with pytest.raises(SystemExit, match="neither an ImageFolder tree"):
        lab.data.load_cifar(Config(dataset="cifar10", data_dir=str(tmp_path / "flat")))
    (tmp_path / "half" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(SystemExit, match="test is missing"):
        lab.data.load_cifar(Config(dataset="cifar10", data_dir=str(tmp_path / "half")))
    cfg = cfg_for(["--preset", "imagenet-resnet50", "--data-dir", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="train not found"):
        lab.data.ImageNetLoader(cfg, torch.device("cpu"), 0, 1)
    with pytest.raises(SystemExit, match="unknown --model 'vgg16'"):
        lab.models.make_model("vgg16", 10, True)
    with pytest.raises(SystemExit, match="unknown --optimizer 'adam'"):
        cfg_for(["--optimizer", "adam"])
    with pytest.raises(SystemExit, match="unknown --preset"):
        train.get_args(["--preset", "mnist"])
    r = run_train("--model", "resnet99")  # a message, not a traceback
    assert r.returncode != 0 and "unknown --model 'resnet99'" in r.stderr and "Traceback" not in r.stderr


def test_bad_numbers_are_one_line_errors_naming_the_value(tmp_path):
    for argv, msg in (
        (["--batch-size", "-64"], "--batch-size -64: must be an integer >= 1"),
        (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
        (["--epochs", "0"], "--epochs 0: must be an integer >= 1"),
        (["--train-size", "-5"], r"--train-size -5: must be 0 \(all images\) or a number of images >= 1"),
        (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
        (["--lr", "-0.1"], "--lr -0.1: must be a finite number > 0"),
        (["--weight-decay", "inf"], "--weight-decay inf: must be a finite number >= 0"),
        (["--optimizer", "sam", "--rho", "-1"], "--rho -1.0: must be a finite number >= 0"),
        (["--optimizer", "ssamf", "--sparsity", "1.5"], r"--sparsity 1.5: must be a fraction in \[0, 1\]"),
        (["--optimizer", "ssamd", "--update-interval", "-1"], r"--update-interval -1: must be 0 \(once"),
        (["--optimizer", "ssamf", "--num-samples", "0"], "--num-samples 0: must be an integer >= 1"),
        (["--optimizer", "ssamd", "--drop-rate", "2"], r"--drop-rate 2.0: must be a fraction in \[0, 1\]"),
        (["--cutout", "-1"], "--cutout -1: must be 0"),
        (["--seed", "-3"], "--seed -3: must be"),
        (["--preset", "imagenet-resnet50", "--workers", "-1"], "--workers -1: must be an integer >= 0"),
    ):
        with pytest.raises(SystemExit, match=msg):
            cfg_for(argv)
    # limits that depend on the data: checked once it is loaded, before anything is written
    for argv, msg in (
        (["--train-size", "6000"], "--train-size 6000: must be at most the 5000 training images"),
        (
            ["--optimizer", "ssamf", "--train-size", "64", "--num-samples", "128"],
            "--num-samples 128: must be at most the 64 training images",
        ),
    ):
        with pytest.raises(SystemExit, match=msg):
            train.train(cfg_for([*argv, "--out-dir", str(tmp_path / "x")]), show_config=False)
        assert not (tmp_path / "x" / "ckpt.pt").exists() and not (tmp_path / "x" / "lock").exists()
    r = run_train("--batch-size", "-64")
    assert r.returncode != 0 and r.stderr.strip() == "--batch-size -64: must be an integer >= 1"


def test_flags_that_would_be_ignored_are_errors():
    for argv, msg in (
        (
            ["--data-dir", "/data/cifar10"],
            "--data-dir would be ignored: --dataset cifar10-subset is the "
            "subset shipped in data/; to train on a tree of your own, pass --dataset cifar10",
        ),
        (["--cache-dir", "/tmp/c"], "--cache-dir would be ignored"),
        (
            ["--rho", "0.2"],
            "--rho would be ignored: it is used by --optimizer sam / ssamf / ssamd / samon only, not sgd",
        ),
        (["--optimizer", "sam", "--sparsity", "0.9"], "--sparsity would be ignored"),
        (["--optimizer", "samon", "--structure", "2:4"], "--structure would be ignored"),
        (["--optimizer", "ssamd", "--num-samples", "64"], "--num-samples would be ignored: .* ssamf only"),
        (["--optimizer", "ssamf", "--drop-rate", "0.3"], "--drop-rate would be ignored: .* ssamd only"),
        (["--optimizer", "ssamf", "--adaptive"], "--adaptive would be ignored: .* sam only"),
        (["--optimizer", "sgd", "--sync-ascent"], "--sync-ascent would be ignored"),
        (["--workers", "4"], "--workers would be ignored: CIFAR sits on the device"),
        (["--preset", "imagenet-resnet50", "--cutout", "8"], "--cutout would be ignored: ImageNet"),
        (["--preset", "imagenet-resnet50", "--train-size", "100"], "--train-size would be ignored"),
        (["--resume", "--fresh"], "--resume and --fresh contradict each other"),
    ):
        with pytest.raises(SystemExit, match=msg):
            cfg_for(argv)
    # what stays allowed: the demo passes one set of flags to every optimizer; torchvision's folder: no cache

    def demo_plans(*argv):  # the runs the demo would train, one list of flags each
        plans = []
        monkey = pytest.MonkeyPatch()
        monkey.setattr(lab.demo, "run_grid", lambda grid, *a, **k: plans.extend(grid) or [])
        monkey.setattr(lab.demo, "Console", lambda: type("C", (), {"print": lambda *a: None})())
        try:
            lab.demo.main(["--demo", *argv], train)
        except (IndexError, TypeError):
            pass  # no runs came back: nothing to print
        finally:
            monkey.undo()
        return plans

    def value(plan, flag):
        return [plan[i + 1] for i, a in enumerate(plan) if a == flag]

    assert demo_plans("--sparsity", "0.9")[0][-2:] == ["--optimizer", "sgd"]  # SGD: without --sparsity
    # the demo's own length (lab.demo.EPOCHS = 2) unless --epochs; the test set once, after the last epoch
    assert all(value(p, "--epochs") == ["2"] and value(p, "--eval-every") == ["2"] for p in demo_plans())
    both = demo_plans("--epochs", "5", "--eval-every", "1")
    assert all(value(p, "--epochs") == ["5"] and value(p, "--eval-every") == ["1"] for p in both)
    plans = demo_plans("--sparsity", "0.9", "--rho", "0.05", "--epochs", "1")  # each: the flags it reads
    assert len(plans) == 5 and all(value(p, "--eval-every") == ["1"] for p in plans)
    assert [("--sparsity" in p, "--rho" in p, "--epochs" in p) for p in plans] == [
        (False, False, True),
        (False, True, True),
        (True, True, True),
        (True, True, True),
        (True, True, True),  # + cost-aware whole-tensor SSAM-F at 0.9: its own --sparsity wins (the last)
    ]
    assert plans[4][-8:] == [
        "--optimizer",
        "ssamf",
        "--sparsity",
        "0.9",
        "--structure",
        "tensor",
        "--mask-select",
        "cost",
    ]
    for flag in (["--optimizer", "sam"], ["--name", "x"], ["--resume"]):  # ...but not a flag it would ignore
        with pytest.raises(SystemExit, match=f"--demo trains sgd, sam, ssamf and ssamd .*: drop {flag[0]}"):
            lab.demo.main(["--demo", *flag], train)
    assert cfg_for(["--optimizer", "sam", "--sync-ascent"]).sync_ascent is True
    with pytest.raises(SystemExit, match="--cache-dir would be ignored: .* not an ImageFolder tree"):
        lab.data.load_cifar(Config(dataset="cifar10", data_dir=str(ROOT / "nowhere"), cache_dir="/tmp/c"))
    r = run_train("--data-dir", "/data/cifar10")
    assert r.returncode != 0 and "--data-dir would be ignored" in r.stderr and "Traceback" not in r.stderr


# -------------------------------------------------------------------------------------------- recipes
def test_presets_follow_the_paper():
    c = cfg_for(["--preset", "cifar100-resnet18", "--optimizer", "ssamf", "--sparsity", "0.9"])
    assert (c.epochs, c.batch_size, c.lr, c.weight_decay, c.rho) == (200, 128, 0.05, 1e-3, 0.2)
    assert c.num_samples == 128 and c.update_interval == 0 and c.cutout == 16
    assert cfg_for(["--preset", "cifar10-resnet18"]).weight_decay == 5e-4  # SGD
    assert cfg_for(["--preset", "cifar10-wrn28-10", "--optimizer", "sam"]).rho == 0.1
    c = cfg_for(["--preset", "imagenet-resnet50", "--optimizer", "ssamd", "--lr", "0.2"])
    assert (c.epochs, c.batch_size, c.lr, c.weight_decay, c.rho) == (90, 256, 0.2, 1e-4, 0.07)
    assert cfg_for(["--optimizer", "sam", "--weight-decay", "0.01"]).weight_decay == 0.01


def test_models():
    m = lab.models.make_model("resnet18", 100, small_images=True)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    wrn = lab.models.make_model("wrn28-10", 10, small_images=True)
    assert abs(sum(p.numel() for p in wrn.parameters()) / 1e6 - 36.48) < 0.05  # WRN-28-10: 36.5M
    assert lab.models.make_model("wrn16-1", 10, True)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    r50 = lab.models.make_model("resnet50", 1000, small_images=False)
    assert r50.conv1.kernel_size == (7, 7) and isinstance(r50.maxpool, nn.MaxPool2d)


# -------------------------------------------------------------------------------------------- steps
def test_fp16_step_with_inf_restores_weights_and_skips_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    autocast = torch.autocast("cpu", dtype=torch.float16)
    calls = []  # inf in the 2nd (descent) backward only
    hook = model[0].weight.register_hook(
        lambda g: (calls.append(1), g * float("inf") if len(calls) == 2 else g)[1]
    )
    w0 = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    train.train_step(model, opt, x, y, autocast, scaler)
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))  # w restored, no step
    assert not opt.base_optimizer.state  # no momentum started
    assert scaler.get_scale() == 512.0 and opt.steps == 1
    hook.remove()
    train.train_step(model, opt, x, y, autocast, scaler)
    assert not all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))  # a real step
    assert all(torch.isfinite(p).all() for p in model.parameters()) and scaler.get_scale() == 512.0


def test_fp16_sgd_step_with_inf_is_skipped_with_weights_and_momentum_untouched():
    """The GradScaler path of train_step for plain SGD, on the CPU (torch.amp.GradScaler works there)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    autocast = torch.autocast("cpu", dtype=torch.float16)
    hook = model[0].weight.register_hook(lambda g: g * float("inf"))
    w0 = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    train.train_step(model, opt, x, y, autocast, scaler)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))  # skipped: no decay
    assert not any("momentum_buffer" in s for s in opt.state.values())  # no momentum started
    assert scaler.get_scale() == 512.0 and all(p.grad is None for p in model.parameters())
    hook.remove()
    train.train_step(model, opt, x, y, autocast, scaler)
    assert all(not torch.equal(a, b) for a, b in zip(w0, model.parameters()))  # a real step
    assert scaler.get_scale() == 512.0 and all(torch.isfinite(p).all() for p in model.parameters())


def test_channels_last_gives_the_default_result(tmp_path, monkeypatch):
    # the step itself, in float64: channels-last changes the memory layout only, so the same numbers to 1e-12
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(16, 3, 32, 32, generator=g, dtype=torch.float64),
        torch.randint(0, 10, (16,), generator=g),
    )
    for o in ("sgd", "sam", "ssamd"):
        weights = []
        for cl in (False, True):
            torch.manual_seed(0)
            model = lab.models.make_model("wrn10-1", 10, True).double()
            model = model.to(memory_format=torch.channels_last) if cl else model
            c = dataclasses.replace(cfg_for([*TINY, "--optimizer", o]), update_interval=2)
            opt = train.make_optimizer(c, model, 4)
            for _ in range(3):
                train.train_step(
                    model,
                    opt,
                    x.contiguous(memory_format=torch.channels_last) if cl else x,
                    y,
                    torch.autocast("cpu", enabled=False),
                )
            weights.append(list(model.state_dict().values()))
        assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(*weights)), o
    # the flag through train(): batches and weights really are channels-last; float32 results agree closely
    real_step, seen = train.train_step, []

    def recording_step(model, opt, x, *args, **kw):
        seen.append(
            (
                x.is_contiguous(memory_format=torch.channels_last),
                model.conv.weight.is_contiguous(memory_format=torch.channels_last),
            )
        )
        return real_step(model, opt, x, *args, **kw)

    monkeypatch.setattr(train, "train_step", recording_step)
    argv = [*TINY, "--train-size", "64", "--epochs", "1", "--optimizer", "sam"]
    a = train.train(cfg_for([*argv, "--out-dir", str(tmp_path / "a")]), show_config=False)
    b = train.train(cfg_for([*argv, "--channels-last", "--out-dir", str(tmp_path / "b")]), show_config=False)
    assert seen == [(False, False)] * 2 + [(True, True)] * 2
    ca, cb = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in "ab")
    for k in ca["model"]:  # float32 rounding, amplified by 2 SAM steps: measured up to 7e-4
        assert torch.allclose(ca["model"][k].float(), cb["model"][k].float(), rtol=0, atol=3e-3), k
    assert abs(a["test_acc"] - b["test_acc"]) <= 0.003  # a few of 1,000 test images may flip


def test_compiled_model_steps_like_the_eager_one():
    """--compile on the CPU (inductor; needs a C++ compiler): a tiny convnet, two SAM steps through
    train_step (the second pass recompiles for the frozen BN statistics), the same weights as eager to float
    precision."""
    from torch._dynamo.utils import counters

    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    weights = []
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        )
        opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
        w0 = [t.detach().clone() for t in model.state_dict().values()]
        for _ in range(2):
            train.train_step(
                torch.compile(model) if compiled else model, opt, x, y, torch.autocast("cpu", enabled=False)
            )
        weights.append([t.detach().clone() for t in model.state_dict().values()])
    assert all(torch.allclose(a.float(), b.float(), atol=1e-6) for a, b in zip(*weights))
    assert not any(torch.equal(a, b) for a, b in zip(weights[1], w0))  # every tensor moved (BN stats too)
    assert counters["stats"]["unique_graphs"] >= 2  # really compiled: two BN modes, two graphs


def test_cuda_only_flags_run_on_the_cpu_and_missing_pieces_are_errors(monkeypatch):
    cfg = cfg_for(["--amp", "fp16", "--compile", "--channels-last", "--device", "cpu"])
    assert train.setup_distributed(cfg)[0] == torch.device("cpu")  # accepted on the CPU (tested above)
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(SystemExit, match="--compile on the CPU needs a C\\+\\+ compiler \\(no-such-compiler"):
        train.setup_distributed(cfg)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: no CUDA device here; pass --device cpu"):
            train.setup_distributed(cfg_for(["--device", "cuda"]))


def test_second_pass_leaves_bn_running_stats_alone():
    torch.manual_seed(0)
    model = lab.models.make_model("wrn10-1", 10, True)
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    ref = lab.models.make_model("wrn10-1", 10, True)
    ref.load_state_dict(model.state_dict())
    ref(x)  # one forward: what the stats should become
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
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, "--out-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while not (out / "ckpt.pt").exists():  # epoch 1 done and checkpointed (atomically)
        assert p.poll() is None and time.time() < deadline, p.stderr.read().decode()[-3000:]
        time.sleep(0.01)
    time.sleep(0.2 * json.loads(log.read_text().splitlines()[0])["time"])  # a few steps into epoch 2
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
    assert (
        a["optimizer"]["counters"]["last_mask_update"] == b["optimizer"]["counters"]["last_mask_update"] > 0
    )
    straight_log = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["test_acc"] for line in log.read_text().splitlines()] == [
        json.loads(line)["test_acc"] for line in straight_log
    ]


def test_crash_then_resume_in_process_is_bit_exact(straight_and_resumed):
    """SSAM-F (its Fisher images come from the data generator) crashing inside epoch 2, then --resume."""
    argv = [
        *TINY,
        "--train-size",
        "256",
        "--epochs",
        "2",
        "--optimizer",
        "ssamf",
        "--update-interval",
        "6",
        "--num-samples",
        "32",
        "--eval-every",
        "2",  # the test accuracy compared: after the last epoch
    ]
    crash_at = 8 + 5  # step 5 of epoch 2
    a, b, ca, cb = straight_and_resumed(lambda *more: cfg_for([*argv, *more]), crash_at)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert a["test_acc"] == b["test_acc"] and ca["optimizer"]["counters"] == cb["optimizer"]["counters"]


def test_bad_checkpoints_are_errors_not_restarts(tmp_path):
    argv = [*TINY, "--epochs", "1", "--train-size", "64", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.train(cfg_for([*argv, "--resume"]), show_config=False)
    train.train(cfg_for(argv), show_config=False)
    ck = tmp_path / "ckpt.pt"
    with pytest.raises(SystemExit, match="pass --resume to continue that run, or --fresh"):
        train.train(cfg_for(argv), show_config=False)  # no silent overwrite either
    with pytest.raises(SystemExit, match=r"different config: lr=0.05 \(now 0.1\)"):
        train.train(cfg_for([*argv, "--lr", "0.1", "--resume"]), show_config=False)
    (tmp_path / "final.json").unlink()  # as if killed before it was written
    good = ck.read_bytes()
    ck.write_bytes(good[: len(good) // 2])  # truncated, as by a full disk
    with pytest.raises(SystemExit, match="unreadable"):
        train.train(cfg_for([*argv, "--resume"]), show_config=False)
    assert ck.read_bytes() == good[: len(good) // 2]  # nothing was overwritten
    r = run_train(*argv[:-2], "--epochs", "1", "--out-dir", str(tmp_path), "--resume")
    assert (
        r.returncode != 0 and "unreadable" in r.stderr and "Traceback" not in r.stderr
    )  # a message on the CLI


def test_a_checkpoint_whose_config_does_not_load_is_refused(tmp_path):
    """tests/fixtures/ckpt-v0-ssamf: a checkpoint whose saved config lacks settings that train.py has (it left
    out those at their default). --resume refuses it with a message naming a missing setting and leaves the
    folder as it was; so does a config holding a setting that train.py does not know."""
    fixture, out = FIXTURES / "ckpt-v0-ssamf", tmp_path / "run"
    out.mkdir()
    for f in ("ckpt.pt", "metrics.jsonl"):
        (out / f).write_bytes((fixture / f).read_bytes())
    saved = torch.load(out / "ckpt.pt", weights_only=True)["config"]
    assert not {"ascent_fraction", "mask_select", "label_noise"} & set(
        saved
    )  # its settings at default: absent
    argv = ["--model", "wrn10-1", "--batch-size", "32", "--train-size", "64", "--epochs", "2"]
    argv += ["--optimizer", "ssamf", "--num-samples", "16", "--name", "old-format", "--out-dir", str(out)]
    with pytest.raises(SystemExit, match=r"ckpt.pt: its config does not load \(no setting '\w+'\)"):
        train.train(cfg_for([*argv, "--resume"]), show_config=False)
    assert all((out / f).read_bytes() == (fixture / f).read_bytes() for f in ("ckpt.pt", "metrics.jsonl"))
    assert not (out / "final.json").exists() and not (out / "lock").exists()
    with pytest.raises(SystemExit, match="does not load"):  # the run listing of a grid says the same
        lab.grid.run_state(cfg_for(argv))
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    ck["config"] = dataclasses.asdict(cfg_for(argv)) | {"momentum": 0.8}
    torch.save(ck, out / "ckpt.pt")
    r = run_train(*argv, "--resume")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "its config does not load (unknown setting 'momentum')" in said(r)


class Planted:
    """Unpickling this writes a file: what a checkpoint someone handed over could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (Path(self.marker), "code ran")


def test_a_planted_checkpoint_runs_no_code(tmp_path):
    argv = [*TINY, "--train-size", "64", "--epochs", "1"]
    cfg = cfg_for([*argv, "--out-dir", str(tmp_path / "run"), "--resume"])
    marker, ck = tmp_path / "marker", tmp_path / "run" / "ckpt.pt"
    ck.parent.mkdir()
    torch.save(dict(config=dataclasses.asdict(cfg), epoch=0, model=Planted(str(marker))), ck)
    r = run_train(*argv, "--out-dir", str(ck.parent), "--resume")
    assert r.returncode != 0 and f"{ck} is unreadable" in said(r) and "Traceback" not in r.stderr
    with pytest.raises(SystemExit, match=f"{ck} is unreadable"):  # the run listing of make reproduce-*
        lab.grid.run_state(cfg)
    assert not marker.exists()
    torch.load(ck, weights_only=False)  # the oracle: loaded as before, the file runs its code
    assert marker.read_text() == "code ran"


def test_diverging_runs_stop_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    # 2 steps an epoch (here: NaN in epoch 2); test accuracy only after the last (it is not the point here)
    argv = [*TINY, "--train-size", "64", "--epochs", "3", "--eval-every", "3"]
    r = run_train(*argv, "--lr", "1e6", "--out-dir", str(tmp_path / "sgd"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "NaN or inf" in said(r) and "Lower --lr" in said(r)
    for o in ("sgd", "sam", "ssamf", "ssamd"):
        message = said(r)
        if o != "sgd":
            with pytest.raises(train.Diverged) as e:
                train.train(
                    cfg_for(
                        [*argv, "--lr", "1e6", "--optimizer", o, "--out-dir", str(tmp_path / o)]
                        + (["--num-samples", "32"] if o == "ssamf" else [])
                    ),
                    show_config=False,
                )
            message = str(e.value)
        good = int(re.search(r"training diverged in epoch (\d+)", message)[1]) - 1  # epochs before it: kept
        assert (tmp_path / o / "ckpt.pt").exists() == (good > 0)
        if good:
            ck = torch.load(tmp_path / o / "ckpt.pt", weights_only=False)
            assert ck["epoch"] == good and all(
                torch.isfinite(t).all() for t in ck["model"].values() if t.is_floating_point()
            )
            assert f"(epoch {good}) is kept as the last good checkpoint" in message
        assert len((tmp_path / o / "metrics.jsonl").read_text().splitlines()) == good
        assert not (tmp_path / o / "final.json").exists() and not (tmp_path / o / "lock").exists()
    # only a BN statistic turns NaN in epoch 2: the loss stays finite (train mode normalizes with the batch's
    # statistics), but the run stops all the same, and its last good checkpoint resumes cleanly
    real_step, calls = train.train_step, []

    def poisoned_step(model, *args, **kw):
        calls.append(1)
        result = real_step(model, *args, **kw)
        if len(calls) == 3:  # epoch 2, step 1 of 2
            with torch.no_grad():
                model.bn.running_var[0] = float("nan")
        return result

    monkeypatch.setattr(train, "train_step", poisoned_step)
    out = tmp_path / "bn"
    with pytest.raises(
        train.Diverged,
        match="diverged in epoch 2 .* a weight or BatchNorm statistic is NaN or inf"
        ".* Stopped: .* \\(epoch 1\\) is kept as the last good checkpoint, no final.json",
    ):
        train.train(cfg_for([*argv, "--optimizer", "sam", "--out-dir", str(out)]), show_config=False)
    assert torch.load(out / "ckpt.pt", weights_only=False)["epoch"] == 1 and not (out / "final.json").exists()
    monkeypatch.setattr(train, "train_step", real_step)
    done = train.train(
        cfg_for([*argv, "--optimizer", "sam", "--out-dir", str(out), "--resume"]), show_config=False
    )
    assert done["epochs"] == 3 and len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_fp16_steps_with_a_non_finite_loss_are_skipped_not_fatal(tmp_path, monkeypatch):
    """With --amp fp16 GradScaler skips a step whose loss overflowed: the run goes on (the step is counted in
    the log). Without fp16 the same loss stops the run."""
    real_step, calls = train.train_step, []

    def overflowing_step(*args, **kw):
        calls.append(1)
        loss, out = real_step(*args, **kw)
        return (loss * float("inf") if len(calls) == 2 else loss), out

    monkeypatch.setattr(train, "train_step", overflowing_step)
    monkeypatch.setattr(
        lab.data.CifarOnDevice,
        "test_batches",
        lambda self: iter([(lab.data.normalize(self.test_x[:8]), self.test_y[:8])]),
    )  # fp16 CPU: slow
    argv = [*TINY, "--train-size", "64", "--epochs", "1", "--optimizer", "sam"]
    done = train.train(
        cfg_for([*argv, "--amp", "fp16", "--out-dir", str(tmp_path / "fp16")]), show_config=False
    )
    log = json.loads((tmp_path / "fp16" / "metrics.jsonl").read_text())
    assert done["epochs"] == 1 and log["nonfinite_loss_steps"] == 1 and math.isfinite(log["loss"])
    calls.clear()
    with pytest.raises(train.Diverged):
        train.train(cfg_for([*argv, "--out-dir", str(tmp_path / "fp32")]), show_config=False)


def test_one_run_per_out_dir(tmp_path):
    out = tmp_path / "run"
    argv = [*TINY, "--epochs", "30", "--out-dir", str(out)]  # killed long before it ends
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *argv],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while not (out / "lock").exists():
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.01)
    r = run_train(*argv[:-2], "--out-dir", str(out), "--fresh")
    assert r.returncode != 0 and f"{out} is in use by another train.py run (process {p.pid}" in said(r)
    p.send_signal(signal.SIGKILL)  # leaves its lock behind: stale
    p.wait()
    assert (out / "lock").exists()
    r = run_train(*argv[:-4], "--epochs", "1", "--train-size", "64", "--out-dir", str(out), "--fresh")
    assert r.returncode == 0 and "removing the stale lock" in said(r), r.stderr[-2000:]
    assert not (out / "lock").exists()  # released on exit
    assert json.loads((out / "final.json").read_text())["epochs"] == 1


def test_resume_drops_a_cut_log_line_and_a_finished_run_stays_as_it_is(tmp_path, monkeypatch):
    argv = [*TINY, "--train-size", "64", "--epochs", "2", "--eval-every", "2", "--out-dir", str(tmp_path)]
    real_step, calls = train.train_step, []

    def crashing_step(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # in epoch 2
            raise KeyboardInterrupt
        return real_step(*args, **kw)

    monkeypatch.setattr(train, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg_for(argv), show_config=False)
    monkeypatch.setattr(train, "train_step", real_step)
    log = tmp_path / "metrics.jsonl"
    line = log.read_text()
    log.write_text(line + line[:25])  # epoch 2's line, cut by a kill mid-write
    done = train.train(cfg_for([*argv, "--resume"]), show_config=False)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and done["train_acc"] == lines[1]["acc"]
    assert done["step_ms"] == pytest.approx((lines[0]["step_ms"] + lines[1]["step_ms"]) / 2)  # both epochs

    final, ck = tmp_path / "final.json", tmp_path / "ckpt.pt"
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in (final, ck, log)}
    r = run_train(*argv, "--resume")  # finished: nothing to do, nothing touched
    assert r.returncode == 0 and f"{tmp_path} is finished (2 epochs, test accuracy" in said(r)
    assert before == {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in (final, ck, log)}
    r = run_train(*argv, "--resume", "--lr", "0.1")
    assert r.returncode != 0 and "different config: lr=0.05 (now 0.1)" in said(r)
    log.write_text('{"epoch": 1, "lo\n' + line)  # a broken line that is not the last: an error
    final.unlink()
    with pytest.raises(SystemExit, match="metrics.jsonl: line 1 is not JSON"):
        train.train(cfg_for([*argv, "--resume"]), show_config=False)


# -------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for optimizer, structure in (("ssamd", "unstructured"), ("ssamf", "unstructured"), ("ssamd", "tensor")):
        torch.manual_seed(0)  # same initial weights on both processes
        model = lab.models.make_model("wrn10-1", 10, True)
        ddp = nn.parallel.DistributedDataParallel(model)
        cfg = Config(
            optimizer=optimizer,
            lr=0.05,
            weight_decay=1e-3,
            rho=0.1,
            adaptive=False,
            sparsity=0.8,
            structure=structure,
            update_interval=2,
            num_samples=16,
            drop_rate=0.5,
            epochs=1,
            seed=0,
        )
        opt = train.make_optimizer(cfg, model, steps_per_epoch=8)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each process
        same, frozen_ok = [], []
        for step in range(5):
            x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
            if optimizer == "ssamf" and opt.mask_update_due:
                opt.update_mask(model, [(x, y), (torch.randn(8, 3, 32, 32, generator=g), y)])
            train.train_step(ddp, opt, x, y, torch.autocast("cpu", enabled=False))  # the ascent local
            flat = torch.cat([m.flatten() for m in opt.masks()]).to(torch.uint8)
            other = [torch.zeros_like(flat) for _ in range(world)]
            dist.all_gather(other, flat)
            same.append(torch.equal(other[0], other[1]))
            left_out = [structure == "tensor" and not m.any() for m in opt.masks()]
            with opt.ascent_pass():  # what the next ascent freezes: the tensors a tensor mask leaves out
                frozen_ok.append([not p.requires_grad for p in opt.masked] == left_out)
        # BN running stats are not compared: DDP copies rank 0's at the start of each forward, so they lag
        results[optimizer + structure] = dict(
            params=torch.cat([p.detach().flatten() for p in model.parameters()]),
            masks=torch.cat([m.flatten() for m in opt.masks()]).to(torch.uint8),
            same=same,
            frozen_ok=frozen_ok,
            updates=opt.last_mask_update,
            steps=opt.steps,
        )
    torch.save(results, f"{result_file}.{rank}")
    dist.destroy_process_group()


def test_ddp_two_processes_keep_weights_and_masks_identical(tmp_path):
    """2 processes, different data, the ascent local (no_sync): after every step (SSAM-F's update_mask from
    each process's own data, SSAM-D's drop-and-grow from its own gradient) both hold rank 0's mask, and with
    tensor masks ascent_pass() freezes exactly the tensors that mask leaves out, on both."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in (0, 1))
    for o in ("ssamdunstructured", "ssamfunstructured", "ssamdtensor"):
        assert r0[o]["steps"] == r1[o]["steps"] == 5 and r0[o]["updates"] == 4  # masks from steps 0, 2, 4
        assert r0[o]["same"] == r1[o]["same"] == [True] * 5, o
        assert r0[o]["frozen_ok"] == r1[o]["frozen_ok"] == [True] * 5, o
        assert torch.equal(r0[o]["params"], r1[o]["params"]), o
        assert torch.equal(r0[o]["masks"], r1[o]["masks"]), o
        if o != "ssamdtensor":
            assert 0.15 < r0[o]["masks"].float().mean() < 0.25  # density 1 - 0.8


def torchrun_one_epoch(out, *flags):
    """train.py for one epoch under torchrun, 2 CPU processes, into out; it must succeed. -> (final.json, the
    epoch's log line)."""
    r = run_train(*flags, "--epochs", "1", "--device", "cpu", "--out-dir", str(out), processes=2)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "final.json").read_text()), json.loads((out / "metrics.jsonl").read_text())


def test_torchrun_two_cpu_processes_end_to_end(tmp_path):
    out = tmp_path / "ddp"
    final, line = torchrun_one_epoch(out, *TINY, "--optimizer", "ssamd", "--update-interval", "3")
    assert final["processes"] == 2 and line["ranks_in_sync"] is True and line["masks_updated"] >= 3
    # the reported accuracy is the final weights' on the WHOLE test split (both processes' shares), counted
    # here again in one process from ckpt.pt (a few near-ties may flip with the batch layout)
    ckpt = lab.runs.read_checkpoint(out / "ckpt.pt")
    model = lab.models.make_model(ckpt["config"]["model"], 10, small_images=True)
    model.load_state_dict(ckpt["model"])
    _, _, test_x, test_y = lab.data.load_cifar(Config(**ckpt["config"]))
    with torch.no_grad():
        pred = torch.cat(
            [model.eval()(lab.data.normalize(test_x[i : i + 1000])).argmax(1) for i in range(0, 10000, 1000)]
        )
    assert len(test_y) == 10000 and abs(final["test_acc"] - float((pred == test_y).float().mean())) <= 3e-4


def test_torchrun_diverged_run_stops_every_process(tmp_path):
    """The NaN check is all-reduced: both processes stop at the same step (no process left waiting in a
    collective), torchrun exits non-zero, nothing is written."""
    out = tmp_path / "ddp"
    r = run_train(
        *TINY,
        "--epochs",
        "2",
        "--lr",
        "1e6",
        "--device",
        "cpu",
        "--out-dir",
        str(out),
        processes=2,
    )
    stops = re.findall(r"training diverged in epoch (\d+) \(by step (\d+) of 12\)", said(r))
    assert r.returncode != 0 and len(stops) == 2 and stops[0] == stops[1], r.stderr[-3000:]  # the same step
    assert (
        not (out / "ckpt.pt").exists() and not (out / "final.json").exists() and not (out / "lock").exists()
    )


# ---------------------------------------------------------------------------------------- structured masks
def test_tensor_masks_and_samon_skip_ascent_gradients_in_train_step():
    """train_step wraps the first pass in opt.ascent_pass(): unperturbed tensors get no ascent gradient there,
    and the flags come back on for the descent pass."""
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for argv in (
        ["--optimizer", "samon"],
        ["--optimizer", "ssamd", "--structure", "tensor", "--sparsity", "0.9"],
    ):
        cfg = cfg_for(argv + TINY)
        torch.manual_seed(0)
        model = lab.models.make_model("wrn10-1", 10, True)
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
        ascent_ids = set(seen[: len(seen) - n])  # the descent pass grads every parameter
        assert not ascent_ids & {id(p) for p in frozen}
        assert all(p.requires_grad for p in model.parameters())
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), w0))


# ----------------------------------------------------------------------------- --sparse-ascent, --sync-ascent
def test_sparse_ascent_flag_is_refused_where_it_cannot_apply():
    for argv, says in (
        (["--optimizer", "sam"], "--optimizer sam --structure"),
        (["--optimizer", "ssamd", "--structure", "tensor"], "--structure tensor"),
        (["--optimizer", "ssamf"], "--structure unstructured"),
    ):
        with pytest.raises(SystemExit, match="--sparse-ascent needs .*" + says):
            cfg_for(argv + ["--sparse-ascent"] + TINY)
    assert cfg_for(["--optimizer", "ssamd"] + TINY).sparse_ascent is False  # off unless given
    cfg = cfg_for(
        [
            "--optimizer",
            "ssamd",
            "--structure",
            "2:4",
            "--sparse-ascent",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--out-dir",
            "/nonexistent/never-written",
        ]
        + TINY
    )
    with pytest.raises(SystemExit, match="wrn10-1 has no nn.Linear with a multiple of 4 outputs"):
        train.train(cfg, show_config=False)  # CIFAR-10's 10-way head: no 2:4 fits


def test_train_step_sparse_ascent_under_bf16_autocast(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Tanh(), nn.Linear(16, 12))
    cfg = cfg_for(["--optimizer", "ssamd", "--structure", "2:4", "--sparse-ascent"] + TINY)
    opt = train.make_optimizer(cfg, model, steps_per_epoch=4)
    calls = []
    real = ssam.sparse_input_grad
    monkeypatch.setattr(ssam, "sparse_input_grad", lambda *a: calls.append(a[1].dtype) or real(*a))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    w0 = [p.detach().clone() for p in model.parameters()]
    train.train_step(model, opt, x, y, torch.autocast("cpu", dtype=torch.bfloat16), sparse_ascent=True)
    assert calls == [torch.bfloat16]  # the upper Linear's dX, in the ascent pass only (not the input's)
    assert opt.steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), w0))
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize(
    "optimizer",
    [["--optimizer", "samon"], ["--optimizer", "ssamd", "--structure", "tensor", "--sparsity", "0.9"]],
)
def test_torchrun_sync_ascent_with_tensor_masks_and_samon(tmp_path, optimizer):
    """The ascent pass skips tensors (requires_grad off): a synchronized backward over them used to crash
    DDP."""
    tiny = ["--model", "wrn10-1", "--batch-size", "32", "--train-size", "128"]
    final, line = torchrun_one_epoch(tmp_path / "ddp", *tiny, *optimizer, "--sync-ascent")
    assert (
        final["processes"] == 2 and line["ranks_in_sync"] is True and final["config"]["sync_ascent"] is True
    )
