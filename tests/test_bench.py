"""Fast checks of the benchmark code in bench/: the numbers it reports are computed right."""
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

import common  # noqa: E402
import report  # noqa: E402
import sharpness  # noqa: E402

import ssam  # noqa: E402


def tiny_convnet():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


# ----------------------------------------------------------------------------------------------------------
# sharpness.py: Lanczos eigenvalues against the exact Hessian

def test_lanczos_matches_exact_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(w):
        ws = dict(zip(names, [c.view(s) for c, s in zip(w.split([s.numel() for s in shapes]), shapes)]))
        return F.cross_entropy(torch.func.functional_call(model, ws, (x,)), y)

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat)).flip(0)
    n = flat.numel()                                          # 43: Lanczos with n steps is exact
    got = sharpness.top_eigenvalues(model, x, y, k=5, iters=n)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), exact[:5], rtol=1e-6, atol=1e-9)
    lam1 = sharpness.top_eigenvalues(model, x, y, k=1, iters=20)[0]   # fewer steps: the top one converges first
    assert abs(lam1 - exact[0].item()) < 1e-4 * exact[0].item()


# ----------------------------------------------------------------------------------------------------------
# common.fisher_loop equals ssam.empirical_fisher (BatchNorm: per-sample statistics in train mode)

@pytest.mark.parametrize("train_mode", [True, False])
def test_fisher_loop_equals_empirical_fisher(train_mode):
    torch.manual_seed(0)
    model = tiny_convnet().double().train(train_mode)
    x, y = torch.randn(12, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    data = [(x[:5], y[:5]), (x[5:], y[5:])]                  # two batches; 9 of the 12 samples used
    buffers = [b.clone() for b in model.buffers()]
    loop = common.fisher_loop(model, data, 9)
    batched = ssam.empirical_fisher(model, data, 9)
    for p in model.parameters():
        torch.testing.assert_close(loop[p], batched[p], rtol=1e-9, atol=1e-12)
        assert p.grad is None
    for b, before in zip(model.buffers(), buffers):           # running statistics untouched
        assert torch.equal(b, before)


# ----------------------------------------------------------------------------------------------------------
# report.py on a small synthetic pytest-benchmark JSON

def bench_entry(kind, seconds, median=None, **extra):
    info = dict(kind=kind, device="cpu", batch=128, width=256, params=1000, param_bytes=4000, **extra)
    if kind == "step":
        info.setdefault("memory", dict(masks=0, momentum=4000, weight_copy=0, total=4000))
    median = median or seconds
    return dict(group="g", name="n", extra_info=info,
                stats=dict(min=seconds, median=median, rounds=3, data=[median, seconds, 2 * median - seconds]))


def step(method, opt, sparsity, seconds, **kw):
    return bench_entry("step", seconds, model="m", method=method, opt=opt, sparsity=sparsity, structure=None,
                       sparse_ascent=False, **kw)


def test_report_ratios_and_verdicts():
    data = dict(machine_info=dict(bench=dict(cpu="Test CPU", cores=2, torch="x")), benchmarks=[
        step("sgd", "sgd", 0.0, 0.100, median=0.200),
        step("sam", "sam", 0.0, 0.210, median=0.300,                # 2.1x SGD: MISS
             memory=dict(masks=0, momentum=4000, weight_copy=4000, total=8000)),
        step("ssamf-s0.5", "ssamf", 0.5, 0.2121),                  # 1.01x SAM: PASS
        step("ssamd-s0.9", "ssamd", 0.9, 0.2205),                  # 1.05x SAM: MISS
        step("ssamd-s0.5", "ssamd", 0.5, 0.2000),
        bench_entry("mask-update", 391 * 0.2121 * 0.005, model="m", opt="ssamf", sparsity=0.5, num_samples=128),
        bench_entry("mask-update", 391 * 0.2000 * 0.02, model="m", opt="ssamd", sparsity=0.5),
        bench_entry("fisher", 1.0, model="m", impl="batched", num_samples=128),
        bench_entry("fisher", 3.0, model="m", impl="loop", num_samples=128),
    ])
    s = report.summarize(data)
    rows = {r["method"]: r for r in s["steps"]}
    assert rows["sam"]["x_sgd"] == pytest.approx(2.1)
    assert rows["sam"]["x_sgd_min"] == pytest.approx(2.1)
    assert rows["ssamf-s0.5"]["x_sam"] == pytest.approx(1.01)
    assert rows["ssamf-s0.5"]["paper"] == 1.65 and rows["ssamd-s0.9"]["paper"] == 1.36 and rows["sam"]["paper"] == 2.0
    upd = {r["what"]: r for r in s["updates"]}
    assert upd["ssamf update_mask"]["interval"] == 391                        # one epoch at batch 128
    assert upd["ssamf update_mask"]["amortized"] == pytest.approx(0.005)      # 0.5%
    assert upd["ssamd update_mask"]["amortized"] == pytest.approx(0.02)       # 2%
    verdicts = [(t["target"].split(": ", 1)[1].split(" ")[0], t["ok"]) for t in s["targets"]]
    assert s["first_steps"] == []
    assert verdicts == [("SAM", False), ("ssamf-s0.5", True), ("ssamd-s0.9", False), ("ssamd-s0.5", True),
                        ("ssamf", True), ("ssamd", False), ("batched", True)]
    text = report.render(data, "synthetic.json")
    assert "Test CPU" in text and "| MISS |" in text and "3 of 7 targets met" not in text
    assert "4 of 7 targets met" in text
    assert "| m | sam | 8,000 | 0.0 | 2.00 |" in text                           # memory: 2x parameter bytes


# ----------------------------------------------------------------------------------------------------------
# The models and the memory count the throughput benchmark relies on

def test_tinyvit_linears_take_2to4_masks_and_memory_is_counted():
    torch.manual_seed(0)
    model = common.TinyViT(width=32, depth=2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = common.make_optimizer(model, "ssamd", 0.5, "2:4")
    with ssam.sparse_ascent(model, opt) as patched:
        assert len(patched) == 1 + 2 * 4                        # embed + 4 per block; the 10-way head is not 2:4
    common.train_step(model, opt, x, y, sparse_ascent=True)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    mem = common.optimizer_state_bytes(opt)
    opt.restore()
    pb = common.param_bytes(model)
    assert mem["weight_copy"] == pb and mem["momentum"] == pb and mem["masks"] == pb // 4
    assert opt.last_mask_update == 0                            # the huge update_interval: no timed update


def test_report_merges_passes():
    first = step("sgd", "sgd", 0.0, 0.30, median=0.40)
    later = step("sgd", "sgd", 0.0, 0.20, median=0.25)
    first["extra_info"]["bench_pass"], later["extra_info"]["bench_pass"] = 0, 1
    del later["extra_info"]["memory"]
    rows = report.merge_passes([later, first])
    (row,) = rows.values()
    assert row["min"] == 0.20 and row["rounds"] == 6 and row["memory"]["total"] == 4000
    assert row["median"] == pytest.approx(0.30)                               # of 0.2 0.25 0.3 0.3 0.4 0.5


def test_report_pairs_ratios_by_pass():
    # pass 0 loaded (everything 2x slower), pass 1 and 2 quiet: pairing by pass gives 2.0 every time, while
    # the overall fastest rounds would pair SGD's quiet pass with SAM's loaded one if SAM had no quiet pass
    entries = []
    for p, load in ((0, 2.0), (1, 1.0), (2, 1.0)):
        for name, opt, t in (("sgd", "sgd", 0.1), ("sam", "sam", 0.2)):
            e = step(name, opt, 0.0, t * load)
            e["extra_info"]["bench_pass"] = p
            entries.append(e)
    entries[3]["stats"]["data"] = [0.4, 0.4, 0.4]                             # SAM slow in pass 1 too...
    entries[3]["stats"]["min"] = 0.4
    entries[2]["stats"]["min"] = 0.2                                          # ...and SGD with it
    entries[2]["stats"]["data"] = [0.2, 0.2, 0.2]
    rows = {r["method"]: r for r in report.summarize(dict(benchmarks=entries))["steps"]}
    assert rows["sam"]["x_sgd"] == pytest.approx(2.0)


def test_report_ssam_overhead_from_first_step():
    # whole steps are noisy (SSAM 1.10x SAM), first_step alone says +2 ms on a 200 ms step: 1.01x
    def first(method, seconds):
        return bench_entry("first_step", seconds, model="m", method=method, opt=method.split("-")[0])
    data = dict(benchmarks=[step("sgd", "sgd", 0.0, 0.100), step("sam", "sam", 0.0, 0.200),
                            step("ssamd-s0.5", "ssamd", 0.5, 0.220), first("sam", 0.010), first("ssamd-s0.5", 0.012)])
    s = report.summarize(data)
    (t,) = [t for t in s["targets"] if "ssamd" in t["target"]]
    assert t["ok"] and t["value"].startswith("1.0100x from first_step (+2.0 ms") and "whole steps 1.100x" in t["value"]
    (fs,) = [r for r in s["first_steps"] if r["method"] == "ssamd-s0.5"]
    assert fs["delta_ms"] == pytest.approx(2.0) and fs["of_sam_step"] == pytest.approx(0.01)


# ----------------------------------------------------------------------------------------------------------
# accuracy.py: confidence intervals and PAIRED differences (same seed)

def test_accuracy_summary_pairs_by_seed():
    import accuracy
    runs = [dict(method=m, sparsity=sp, seed=s, test_acc=a / 100) for m, sp, accs in (
        ("sgd", None, (40.0, 50.0, 60.0)), ("sam", None, (42.0, 51.0, 63.0)), ("ssamd", 0.5, (41.0, 52.0, 62.0)))
        for s, a in enumerate(accs)] + [dict(method="sgd", sparsity=None, seed=7, test_acc=0.99)]   # not in seeds
    rows = {(r["method"], r["sparsity"]): r for r in accuracy.summarize(runs, [0, 1, 2])}
    sgd, sam, ssamd = rows["sgd", None], rows["sam", None], rows["ssamd", 0.5]
    assert sgd["n"] == 3 and sgd["mean"] == pytest.approx(50.0)
    assert sgd["ci"] == pytest.approx(4.303 * 10.0 / 3 ** 0.5)            # t(2 dof) * sd / sqrt(n)
    # unpaired, SAM's +2 would drown in a ±25 interval; paired, the differences are 2, 1, 3: 2 ± 4.303 * 1 / sqrt(3)
    assert sam["vs_sgd"][0] == pytest.approx(2.0) and sam["vs_sgd"][1] == pytest.approx(4.303 / 3 ** 0.5)
    assert sam["vs_sgd"][2] == 3 and sam["vs_sam"] is None and sgd["vs_sgd"] is None
    assert ssamd["vs_sam"][0] == pytest.approx(-1 / 3) and ssamd["per_seed"] == [41.0, 52.0, 62.0]
    text = accuracy.render(dict(settings=dict(setting=["--x"], jobs=2), machine=dict(cpu="c", cores=2, torch="t"),
                                wall_s=60, trained=0, seed_sets={"s": [0, 1, 2]}, runs=runs,
                                summary={"s": accuracy.summarize(runs, [0, 1, 2])}))
    assert "| SAM | 52.00 ± " in text and "| 2.00 ± 2.48 |" in text


# ----------------------------------------------------------------------------------------------------------
# The one runner (train.py run_grid): names from the config, "done" = final.json with the same config

def test_runner_names_and_done_rule(tmp_path):
    import json
    import train
    toy = ["--model", "wrn10-1", "--epochs", "1", "--train-size", "128"]
    cfg, recipe = train.grid_run(["--preset", "cifar10-resnet18", "--optimizer", "ssamf", "--sparsity", "0.5"], tmp_path)
    assert recipe and cfg["name"] == "cifar10-resnet18-ssamf-s0.5-seed0" and cfg["out_dir"] == str(tmp_path / cfg["name"])
    cfg, recipe = train.grid_run(["--optimizer", "sam", "--seed", "3"] + toy, tmp_path)
    assert not recipe and cfg["name"] == "cifar10-subset-sam-seed3-epochs1-train-size128"
    assert train.run_state(cfg) == "todo"
    d = tmp_path / cfg["name"]
    d.mkdir()
    (d / "final.json").write_text(json.dumps(dict(config=dict(cfg, out_dir="elsewhere", fresh=True), test_acc=0.5)))
    assert train.run_state(cfg) == "done"                               # where it was stored does not matter
    done = train.run_grid([["--optimizer", "sam", "--seed", "3"] + toy], tmp_path)     # reused, nothing trained
    assert done[0][1]["test_acc"] == 0.5
    (d / "final.json").write_text(json.dumps(dict(config=dict(cfg, lr=0.1), test_acc=0.5)))
    assert train.run_state(cfg).startswith("other: lr=0.1 (now 0.05)")
    with pytest.raises(SystemExit, match="holds a run of another config .lr=0.1 .now 0.05..: move it away, or pass --fresh"):
        train.run_grid([["--optimizer", "sam", "--seed", "3"] + toy], tmp_path)
    with pytest.raises(ValueError, match="drop --name/--out-dir"):
        train.grid_run(["--out-dir", "x"], tmp_path)


# ----------------------------------------------------------------------------------------------------------
# scripts/reproduce.py end to end on a toy grid: cells traceable to runs, seeds counted, non-recipe runs apart

def test_reproduce_toy_grid_table(tmp_path):
    import json
    import subprocess
    import train
    root = os.path.dirname(BENCH)
    toy = "--dataset cifar10-subset --model wrn10-1 --epochs 1 --train-size 192 --batch-size 64"
    env = dict(os.environ, MODELS="resnet18", DATASETS="cifar10", OPTIMIZERS="sgd", SEEDS="0,1", EXTRA=toy,
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(root, "scripts", "reproduce.py"), "cifar", "--runs-dir", str(tmp_path / "rep")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "rep").iterdir())
    assert names == [f"cifar10-resnet18-sgd-seed{s}-datasetcifar10-subset-modelwrn10-1-epochs1-batch-size64-train-size192"
                     for s in (0, 1)]
    table = (tmp_path / "reproduce_table1.md").read_text()
    sgd_row = next(line for line in table.splitlines() if line.startswith("| sgd |"))
    assert sgd_row.split(" | ")[3] == "—"                                    # not in the paper's column...
    (other,) = [line for line in table.splitlines() if line.startswith("| cifar10 resnet18 sgd |")]
    assert "epochs 1" in other and "train-size 192" in other and "model wrn10-1" in other    # ...but apart, marked
    accs = [100 * json.loads((tmp_path / "rep" / n / "final.json").read_text())["test_acc"] for n in names]
    assert f"{sum(accs) / 2:.2f} ± " in other and "(2 seeds)" in other and all(n in other for n in names)

    # a finished run with the paper's recipe goes into the table, with its seed count and its folder
    recipe, _ = train.grid_run(["--preset", "cifar10-resnet18", "--optimizer", "sgd", "--seed", "0"], tmp_path / "rep")
    os.makedirs(recipe["out_dir"])
    with open(os.path.join(recipe["out_dir"], "final.json"), "w") as f:
        json.dump(dict(config=recipe, test_acc=0.9612), f)
    r = subprocess.run(cmd + ["--report"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "reproduce_table1.md").read_text()
    assert "| sgd | — | 96.07 | 96.12 (1 seed) | +0.05 |" in table
    assert "- cifar10 resnet18 sgd: cifar10-resnet18-sgd-seed0\n" in table

    # the same command again trains nothing; a changed EXTRA is a new run, never the old one reused
    r = subprocess.run(cmd + ["--dry-run"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.count("done") == 2 and "todo" not in r.stderr
    r = subprocess.run(cmd + ["--dry-run"], env=dict(env, EXTRA=toy.replace("--epochs 1", "--epochs 2")),
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.count("todo") == 2 and "done" not in r.stderr


def test_reproduce_cifar_short_runs_on_cpu(tmp_path):
    """make reproduce-cifar-short's grid with a tiny override (1 epoch, 128 images, wrn10-1, bf16 autocast)."""
    import subprocess
    root = os.path.dirname(BENCH)
    env = dict(os.environ, OPTIMIZERS="sgd,ssamf", SHORT_EPOCHS="1", SHORT_FLAGS="--amp bf16", OMP_NUM_THREADS="1",
               EXTRA="--dataset cifar10-subset --model wrn10-1 --train-size 128 --batch-size 64")
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "reproduce.py"), "cifar-short", "--runs-dir",
                        str(tmp_path / "rep")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "reproduce_short.md").read_text()
    assert "1 epochs (the paper trains 200: not its recipe), amp bf16" in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row[0] for row in rows] == ["| sgd", "| ssamf 0.5", "| ssamf 0.9 tensor"]
    assert rows[0][3] == "1.00" and all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)
    assert all("(1 seed)" in row[1] for row in rows) and table in r.stdout


def test_demo_prints_lambda1(tmp_path):
    import subprocess
    root = os.path.dirname(BENCH)
    cmd = [sys.executable, os.path.join(root, "train.py"), "--demo", "--epochs", "1", "--train-size", "128",
           "--batch-size", "32", "--out-dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("│ ") and "%" in line]
    assert [row.split("│")[1].strip() for row in rows] == ["sgd", "sam", "ssamf", "ssamd"]
    lam = [float(row.split("│")[7]) for row in rows]                     # the Hessian's lambda_1 column
    assert all(v > 0 for v in lam) and "10,000 test images" not in r.stdout and "10000 test images" in r.stdout
    assert "lower = flatter minimum" in r.stdout and "make bench-accuracy" in r.stdout
