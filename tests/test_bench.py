"""Fast checks of the benchmark code in bench/ and lab/{methods,stats,sharpness}.py: the numbers it reports
are computed right, and the committed tables come out of the committed JSON byte for byte."""

import json
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ssam
from bench import accuracy, common, report
from lab import demo, grid, methods, sharpness, stats
from lab.config import Config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def tiny_convnet():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


# ----------------------------------------------------------------------------------------------------------
# lab/sharpness.py: Lanczos eigenvalues against the exact Hessian; checkpoints loaded without running code


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
    n = flat.numel()  # 43: Lanczos with n steps is exact
    got = sharpness.top_eigenvalues(model, x, y, k=5, iters=n)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), exact[:5], rtol=1e-6, atol=1e-9)
    lam1 = sharpness.top_eigenvalues(model, x, y, k=1, iters=20)[
        0
    ]  # fewer steps: the top one converges first
    assert abs(lam1 - exact[0].item()) < 1e-4 * exact[0].item()


class Planted:
    """Unpickling this runs code (os.system through __reduce__): what a booby-trapped ckpt.pt would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "run" / "ckpt.pt"
    path.parent.mkdir()
    torch.save(dict(model={}, config=dict(model="wrn10-1", dataset="cifar10"), x=Planted(marker)), path)
    with pytest.raises(SystemExit, match="sharpness: .*ckpt.pt is unreadable or not a train.py") as e:
        sharpness.load_run(path, "cpu")
    assert str(path) in str(e.value) and not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# report.py on small synthetic pytest-benchmark JSONs; lab/stats.py's verdicts


def entry(kind, seconds, rnd=0, **extra):
    info = dict(
        kind=kind, device="cpu", batch=128, width=256, params=1000, param_bytes=4000, bench_round=rnd, **extra
    )
    return dict(group="g", name="n", extra_info=info, stats=dict(min=seconds, median=seconds, rounds=1))


def step(method, opt, seconds, rnd=0, flags="", sparsity=0.0, **kw):
    return entry(
        "step",
        seconds,
        rnd,
        model="m",
        method=method,
        opt=opt,
        flags=flags,
        sparsity=sparsity,
        weights="fresh",
        ascent_fraction=kw.pop("ascent_fraction", 1.0),
        memory=dict(masks=0, momentum=4000, weight_copy=0, total=4000),
        **kw,
    )


def rounds(times, make):
    """One entry per round: the machine's load in round r multiplies every time of that round by times[r]."""
    return [make(load, r) for r, load in enumerate(times)]


def test_verdicts_use_the_whole_interval():
    assert stats.target_verdict(1.30, 1.40, 1.45) == "PASS"
    assert stats.target_verdict(1.50, 1.60, 1.45) == "MISS"
    assert stats.target_verdict(1.40, 1.50, 1.45) == "UNDECIDED"
    assert stats.target_verdict(1.10, 1.30, 1.0, at_most=False) == "PASS"
    assert stats.target_verdict(0.80, 1.05, 1.0, at_most=False) == "UNDECIDED"
    assert stats.interval([[2.0] * 10]) == (2.0, 2.0)
    lo, hi = stats.interval([[1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9]])
    assert 1.0 <= lo < stats.median([1.0, 1.9]) < hi <= 1.9


def test_report_ratios_are_per_round_medians_with_intervals_and_verdicts():
    load = [1.0, 3.0, 1.2, 1.0, 2.0, 1.1, 1.0, 1.5, 1.0, 1.3]  # other jobs slow whole rounds down
    cost = "--optimizer ssamf --sparsity 0.9 --structure tensor --mask-select cost"
    benchmarks = (
        rounds(load, lambda x, r: step("sgd", "sgd", 0.100 * x, r))
        + rounds(load, lambda x, r: step("sam", "sam", 0.210 * x, r))  # 2.1x: MISS
        + rounds(load, lambda x, r: step("sam-f0.25", "sam", 0.130 * x, r, ascent_fraction=0.25))  # PASS
        + rounds(
            load,
            lambda x, r: step("ssamf-s0.9-tensor-cost", "ssamf", (0.140 + 0.02 * (r % 2)) * x, r, cost, 0.9),
        )
        + [entry("mask-update", 391 * 0.1 * 0.005, r, model="m", opt="ssamf", sparsity=0.5) for r in range(3)]
        + [entry("fisher", 1.0, r, model="m", num_samples=128) for r in range(3)]
    )
    data = dict(machine_info=dict(bench=dict(cpu="Test CPU", cores=2, torch="x")), benchmarks=benchmarks)
    s = report.summarize(data)
    rows = {r["method"]: r for r in s["steps"]}
    assert rows["sam"]["x_sgd"] == pytest.approx((2.1, 2.1, 2.1))  # load cancels within a round
    assert rows["sam"]["ms"] == pytest.approx(1e3 * 0.210 * 1.15)  # median time over rounds
    assert rows["sam-f0.25"]["x_sam"] == pytest.approx(0.13 / 0.21) and rows["sam-f0.25"]["paper"] is None
    m, lo, hi = rows["ssamf-s0.9-tensor-cost"]["x_sgd"]
    assert (
        m == pytest.approx(1.5) and lo == pytest.approx(1.4) and hi == pytest.approx(1.6)
    )  # 1.4, 1.6 by round
    verdicts = {t["target"].split(": ", 1)[1].split(" ")[0]: t["verdict"] for t in s["targets"]}
    assert verdicts == {
        "SAM": "MISS",
        "sam-f0.25": "PASS",
        "ssamf-s0.9-tensor-cost": "UNDECIDED",
        "ssamf": "PASS",
    }
    upd = {r["what"]: r for r in s["updates"]}
    assert upd["ssamf update_mask"]["interval"] == 391
    # the per-step update cost over the ssamf step's median time
    assert upd["ssamf update_mask"]["amortized"] == pytest.approx(0.0005 / 0.172)
    text = report.render(data, "synthetic.json")
    assert "Test CPU" in text and "| MISS |" in text and "| UNDECIDED |" in text
    assert "2 PASS, 1 MISS, 1 UNDECIDED of 4 targets" in text
    assert upd["Fisher (ssam.empirical_fisher), 128 samples"]["ms"] == pytest.approx(1e3)


def test_report_ssam_overhead_from_first_step():
    # per round: SAM's step plus first_step's difference; whole steps would say 1.10x, first_step says 1.01x
    def first(method, seconds, r):
        return entry("first_step", seconds, r, model="m", method=method, opt=method.split("-")[0])

    data = dict(
        benchmarks=[
            e
            for r in range(5)
            for e in (
                step("sgd", "sgd", 0.100, r),
                step("sam", "sam", 0.200, r),
                step("ssamd-s0.5", "ssamd", 0.220, r, sparsity=0.5),
                first("sam", 0.010, r),
                first("ssamd-s0.5", 0.012, r),
            )
        ]
    )
    s = report.summarize(data)
    (t,) = [t for t in s["targets"] if "ssamd" in t["target"]]
    assert t["verdict"] == "PASS" and t["median"] == pytest.approx(1.01)
    (fs,) = [r for r in s["first_steps"] if r["method"] == "ssamd-s0.5"]
    assert fs["delta_ms"] == pytest.approx(2.0) and fs["of_sam_step"] == pytest.approx(0.01)


# ----------------------------------------------------------------------------------------------------------
# What the benchmark times and counts


def test_flop_bound_counts_forward_input_and_weight_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.LayerNorm(3))
    x = torch.randn(2, 4)
    # Linear 1: forward 2*5*4 = 40 and weight gradient 40 (x needs no gradient); Linear 2: 30 x 3;
    # LayerNorm: 6 x 3
    full = 40 * 2 + 30 * 3 + 6 * 3
    assert common.pass_macs(model, x) == full
    model[0].weight.requires_grad_(False)  # 5 of Linear 1's 25 parameters (the bias) still need one
    assert common.pass_macs(model, x) == full - 40 * 20 / 25
    model[0].weight.requires_grad_(True)
    opt, cfg = common.make_optimizer(model, "--optimizer sam --ascent-fraction 0.5")
    assert common.flops_x_sgd(model, opt, cfg, x) == pytest.approx(1.5)  # the ascent on 1 of 2 samples
    opt, cfg = common.make_optimizer(model, "--optimizer samon")  # ascent: forward, LayerNorm's dW only
    assert common.flops_x_sgd(model, opt, cfg, x) == pytest.approx((40 + 30 + 6 * 2 + full) / full)
    assert all(p.requires_grad for p in model.parameters())


def test_the_timed_step_is_train_py_step(monkeypatch):
    torch.manual_seed(0)
    model = common.TinyViT(width=32, depth=2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))  # what the step does, not the data
    opt, cfg = common.make_optimizer(model, "--optimizer ssamd --sparsity 0.5 --structure 2:4")
    assert isinstance(opt, ssam.SSAMD) and opt.nm == (2, 4) and cfg.lr == 0.05  # the cifar10-resnet18 recipe
    calls = []
    real = common.train.train_step
    monkeypatch.setattr(common.train, "train_step", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    common.train_step(model, opt, cfg, x, y)
    assert calls == [dict(sync_ascent=False, sparse_ascent=False, ascent_fraction=1.0)]  # train.py's step
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    mem = common.optimizer_state_bytes(opt)
    opt.restore()
    pb = common.param_bytes(model)
    assert mem["weight_copy"] == pb and mem["momentum"] == pb and mem["masks"] == pb // 4
    assert opt.last_mask_update == 0  # the huge update_interval: no timed update
    assert common.make_model("resnet18").conv1.kernel_size == (3, 3)  # train.py's CIFAR stem


# ----------------------------------------------------------------------------------------------------------
# accuracy.py and lab/stats.py: confidence intervals and PAIRED differences (same seed)


def test_accuracy_summary_pairs_by_seed():
    runs = [
        dict(method=m, sparsity=sp, seed=s, test_acc=a / 100)
        for m, sp, accs in (
            ("sgd", None, (40.0, 50.0, 60.0)),
            ("sam", None, (42.0, 51.0, 63.0)),
            ("ssamd", 0.5, (41.0, 52.0, 62.0)),
        )
        for s, a in enumerate(accs)
    ] + [dict(method="sgd", sparsity=None, seed=7, test_acc=0.99)]  # not in seeds
    rows = {(r["method"], r["sparsity"]): r for r in accuracy.summarize(runs, [0, 1, 2])}
    sgd, sam, ssamd = rows["sgd", None], rows["sam", None], rows["ssamd", 0.5]
    assert sgd["n"] == 3 and sgd["mean"] == pytest.approx(50.0)
    assert sgd["ci"] == pytest.approx(4.303 * 10.0 / 3**0.5)  # t(2 dof) * sd / sqrt(n)
    # unpaired, SAM's +2 would drown in a ±25 interval; paired, the differences are 2, 1, 3:
    # 2 ± 4.303 * 1 / sqrt(3)
    assert sam["vs_sgd"][0] == pytest.approx(2.0) and sam["vs_sgd"][1] == pytest.approx(4.303 / 3**0.5)
    assert sam["vs_sgd"][2] == 3 and sam["vs_sam"] is None and sgd["vs_sgd"] is None
    assert ssamd["vs_sam"][0] == pytest.approx(-1 / 3) and ssamd["per_seed"] == [41.0, 52.0, 62.0]
    text = accuracy.render(
        dict(
            settings=dict(setting=["--x"], jobs=2),
            machine=dict(cpu="c", cores=2, torch="t"),
            wall_s=60,
            trained=0,
            seed_sets={"s": [0, 1, 2]},
            runs=runs,
            summary={"s": accuracy.summarize(runs, [0, 1, 2])},
        )
    )
    assert "| SAM | 52.00 ± " in text and "| 2.00 ± 2.48 |" in text
    assert "exact method" not in text and "verdict" not in text and ssamd["vs_ref"] is None  # none cheaper


def test_accuracy_cheaper_method_paired_with_its_exact_method():
    accs = {
        ("sam", None): (42.0, 51.0, 63.0, 40.0, 45.0, 50.0),
        ("sam-f0.25", None): (41.0, 51.5, 62.0, 39.0, 45.5, 49.0),
        ("ssamf-tensor-cost", 0.9): (30.0, 31.0, 32.0, 33.0, 34.0, 35.0),
    }  # its reference SSAM-F 0.9 never ran
    runs = [
        dict(method=m, sparsity=sp, seed=s, test_acc=a / 100, step_ms=10.0 * (s + 1) + (m == "sam"))
        for (m, sp), row in accs.items()
        for s, a in enumerate(row)
    ]
    sets = {
        "seeds 0-2": [0, 1, 2],
        "seeds 3-5 (the confirmation set)": [3, 4, 5],
        "all seeds (0-5)": list(range(6)),
    }
    summary = {t: accuracy.summarize(runs, ss) for t, ss in sets.items()}
    rows = {(r["method"], r["sparsity"]): r for r in summary["all seeds (0-5)"]}
    f25, sam, cost = rows["sam-f0.25", None], rows["sam", None], rows["ssamf-tensor-cost", 0.9]
    d = [-1.0, 0.5, -1.0, -1.0, 0.5, -1.0]  # sam-f0.25 - sam, seed by seed
    assert f25["ref"] == "SAM" and f25["vs_ref"][0] == pytest.approx(-0.5) and f25["vs_ref"][2] == 6
    assert f25["vs_ref"][1] == pytest.approx(2.571 * statistics.stdev(d) / 6**0.5)
    assert f25["step_ms"] == pytest.approx(35.0) and sam["step_ms"] == pytest.approx(
        36.0
    )  # median over seeds
    assert sam["ref"] is None and sam["vs_ref"] is None
    assert cost["ref"] == "SSAM-F 0.9" and cost["vs_ref"] is None  # no runs of the reference
    assert stats.cheaper_verdict(f25["vs_ref"]) == "keeps"  # -0.5 ± 0.81: CI holds 0
    text = accuracy.render(
        dict(
            settings=dict(setting=["--x"], jobs=2),
            machine=dict(cpu="c", cores=2, torch="t"),
            wall_s=60,
            trained=0,
            seed_sets=sets,
            runs=runs,
            summary=summary,
        )
    )
    tables = text.split("## ")
    assert all("paired Δ vs its exact method" in t for t in tables[1:])
    assert "verdict" not in tables[1] and "verdict" not in tables[2] and "| verdict |" in tables[3]
    assert f"| -0.50 ± {f25['vs_ref'][1]:.2f} (vs SAM) | keeps |" in tables[3]
    assert "| no run of SSAM-F 0.9 | – |" in text
    assert "| SSAM-F cost-aware 0.9 |" in text and "Decision rule, fixed before the runs" in text
    assert "2 at a time" in text and "throughput.md" in text


def test_accuracy_verdict_rule():
    v = stats.cheaper_verdict
    assert v((-0.5, 0.8, 6)) == "keeps"  # CI [-1.3, 0.3] holds 0, mean above -1
    assert v((0.0, 0.0, 6)) == "keeps"  # a CI that touches 0 includes it
    assert v((-1.2, 1.5, 6)) == "undecided"  # CI holds 0 but the mean is not above -1 point
    assert v((-1.0, 1.5, 6)) == "undecided"  # -1 itself is not above -1
    assert v((-0.9, 0.5, 6)) == "loses"  # CI [-1.4, -0.4]: all below 0
    assert v((-0.1, 0.05, 6)) == "loses"  # small but resolved loss
    assert v((0.9, 0.5, 6)) == "gains"  # CI [0.4, 1.4]: all above 0
    assert v(None) is None and v((-0.5, float("nan"), 1)) is None


def test_accuracy_method_names_round_trip_through_train_config(tmp_path):

    cfgs = {}
    every = accuracy.METHODS + accuracy.MORE + accuracy.CHEAPER
    every += [(m, sp) for m, e in methods.METHODS.items() for sp, _ in e["bench"]]  # the throughput bench's
    for method, sp in every:
        cfg, _ = grid.grid_run(accuracy.SETTING + methods.flags(method, sp) + ["--seed", "3"], tmp_path)
        assert methods.method_of(cfg) == (method, sp)
        flags = methods.flags(*methods.method_of(cfg))
        again, _ = grid.grid_run(accuracy.SETTING + flags + ["--seed", "3"], tmp_path)
        assert again == cfg
        cfgs[method, sp] = cfg
        methods.label(method, sp)  # every method has a name
        assert methods.split(methods.key(method, sp)) == (method, sp)  # and one word for the benchmarks
        # a method's name is what its settings add to a run name (the default sparsity 0.5 is not named)
        assert cfg.name.startswith(f"cifar10-subset-{methods.key(method, None if sp == 0.5 else sp)}-")
    assert len({c.name for c in cfgs.values()}) == len(cfgs)  # one run folder per method
    names = set(methods.METHODS)
    assert len({methods.color(m) for m in names}) == len(names)  # and a colour of its own in the figures
    cost_f, sam_f = cfgs["ssamf-tensor-cost-f0.25", 0.9], cfgs["sam-f0.5", None]
    assert cost_f.mask_select == "cost" and sam_f.ascent_fraction == 0.5
    cost_d = cfgs["ssamd-tensor-cost", 0.9]
    assert cost_d.structure == "tensor" and cost_d.ascent_fraction == 1.0 and "-f" not in cost_d.name
    assert set(accuracy.CHEAPER_REF) <= set(accuracy.CHEAPER)
    assert all(ref in accuracy.METHODS + accuracy.CHEAPER for ref in accuracy.CHEAPER_REF.values())
    assert methods.label("ssamf-tensor-cost", 0.9) == "SSAM-F cost-aware 0.9"
    assert methods.label("sam-f0.25", None) == "SAM f=0.25"
    assert methods.label("ssamf-tensor-cost-f0.25", 0.9) == "SSAM-F cost-aware 0.9, f=0.25"
    for bad in ("ssamf-2of4", "adam", "sam-tensor-x"):
        with pytest.raises(ValueError, match=f"method '{bad}' is not in lab/methods.py"):
            methods.flags(bad, 0.5)


# ----------------------------------------------------------------------------------------------------------
# The committed tables: bench/results/*.md come out of bench/results/*.json byte for byte


def test_committed_tables_render_byte_identical_from_their_json():
    data = json.loads((RESULTS / "throughput.json").read_text())
    also = [
        (
            json.loads((RESULTS / "frontier-throughput.json").read_text()),
            "bench/results/frontier-throughput.json",
        )
    ]
    text = report.render(
        data, "bench/results/throughput.json", also
    )  # `make bench-report` from the repo root
    assert text == (RESULTS / "throughput.md").read_text()
    assert "| vit | 32 | sam-k10-a0.7 | fresh |" in text.split("# Steps timed in another run")[1]  # appended
    result = json.loads((RESULTS / "accuracy.json").read_text())
    assert accuracy.rerender(result) == (RESULTS / "accuracy.md").read_text()  # summaries made again


# ----------------------------------------------------------------------------------------------------------
# The one runner (lab/grid.py run_grid): names from the config, "done" = final.json with the same config


def test_runner_names_and_done_rule(tmp_path):
    import dataclasses
    import json

    toy = ["--model", "wrn10-1", "--epochs", "1", "--train-size", "128"]
    cfg, recipe = grid.grid_run(
        ["--preset", "cifar10-resnet18", "--optimizer", "ssamf", "--sparsity", "0.9"], tmp_path
    )
    assert (
        recipe and cfg.name == "cifar10-resnet18-ssamf-s0.9-seed0" and cfg.out_dir == str(tmp_path / cfg.name)
    )
    cfg, recipe = grid.grid_run(["--preset", "cifar10-resnet18", "--optimizer", "ssamf"], tmp_path)
    assert recipe and cfg.name == "cifar10-resnet18-ssamf-seed0"  # the default sparsity, 0.5: not named
    cfg, recipe = grid.grid_run(["--optimizer", "sam", "--seed", "3"] + toy, tmp_path)
    assert not recipe and cfg.name == "cifar10-subset-sam-epochs1-train-size128-seed3"
    assert grid.run_state(cfg) == "todo"
    d = tmp_path / cfg.name
    d.mkdir()
    saved = dataclasses.asdict(cfg)
    (d / "final.json").write_text(
        json.dumps(dict(config=dict(saved, out_dir="elsewhere", fresh=True), test_acc=0.5))
    )
    assert grid.run_state(cfg) == "done"  # where it was stored does not matter
    done = grid.run_grid([["--optimizer", "sam", "--seed", "3"] + toy], tmp_path)  # reused, nothing trained
    assert done[0][1]["test_acc"] == 0.5
    (d / "final.json").write_text(json.dumps(dict(config=dict(saved, lr=0.1), test_acc=0.5)))
    assert grid.run_state(cfg).startswith("other: lr=0.1 (now 0.05)")
    with pytest.raises(
        SystemExit, match="holds a run of another config .lr=0.1 .now 0.05..: move it away, or pass --fresh"
    ):
        grid.run_grid([["--optimizer", "sam", "--seed", "3"] + toy], tmp_path)
    with pytest.raises(ValueError, match="drop --name/--out-dir"):
        grid.grid_run(["--out-dir", "x"], tmp_path)


# ----------------------------------------------------------------------------------------------------------
# scripts/reproduce.py end to end on a toy grid: cells traceable to runs, seeds counted, non-recipe runs apart


def test_reproduce_toy_grid_table(tmp_path):
    import dataclasses
    import json
    import subprocess

    root = str(ROOT)
    toy = "--dataset cifar10-subset --model wrn10-1 --epochs 1 --train-size 192 --batch-size 64"
    env = dict(
        os.environ,
        MODELS="resnet18",
        DATASETS="cifar10",
        OPTIMIZERS="sgd",
        SEEDS="0,1",
        EXTRA=toy,
        OMP_NUM_THREADS="1",
    )
    cmd = [
        sys.executable,
        os.path.join(root, "scripts", "reproduce.py"),
        "cifar",
        "--runs-dir",
        str(tmp_path / "rep"),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "rep").iterdir())
    assert names == [
        f"cifar10-resnet18-sgd-datasetcifar10-subset-modelwrn10-1-epochs1-batch-size64-train-size192-seed{s}"
        for s in (0, 1)
    ]
    table = (tmp_path / "reproduce_table1.md").read_text()
    sgd_row = next(line for line in table.splitlines() if line.startswith("| sgd |"))
    assert sgd_row.split(" | ")[3] == "—"  # not in the paper's column...
    (other,) = [line for line in table.splitlines() if line.startswith("| cifar10 resnet18 sgd |")]
    assert (
        "epochs 1" in other and "train-size 192" in other and "model wrn10-1" in other
    )  # ...but apart, marked
    accs = [100 * json.loads((tmp_path / "rep" / n / "final.json").read_text())["test_acc"] for n in names]
    assert f"{sum(accs) / 2:.2f} ± " in other and "(2 seeds)" in other and all(n in other for n in names)

    # a finished run with the paper's recipe goes into the table, with its seed count and its folder
    recipe, _ = grid.grid_run(
        ["--preset", "cifar10-resnet18", "--optimizer", "sgd", "--seed", "0"], tmp_path / "rep"
    )
    os.makedirs(recipe.out_dir)
    with open(os.path.join(recipe.out_dir, "final.json"), "w") as f:
        json.dump(dict(config=dataclasses.asdict(recipe), test_acc=0.9612), f)
    r = subprocess.run(cmd + ["--report"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "reproduce_table1.md").read_text()
    assert "| sgd | — | 96.07 | 96.12 (1 seed) | +0.05 |" in table
    assert "- cifar10 resnet18 sgd: cifar10-resnet18-sgd-seed0\n" in table

    # the same command again trains nothing; a changed EXTRA is a new run, never the old one reused
    r = subprocess.run(cmd + ["--dry-run"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.count("done") == 2 and "todo" not in r.stderr
    r = subprocess.run(
        cmd + ["--dry-run"],
        env=dict(env, EXTRA=toy.replace("--epochs 1", "--epochs 2")),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stderr.count("todo") == 2 and "done" not in r.stderr


def test_reproduce_cifar_short_runs_on_cpu(tmp_path):
    """make reproduce-cifar-short's grid, tiny override (1 epoch, 128 images, wrn10-1, bf16 autocast)."""
    import subprocess

    root = str(ROOT)
    env = dict(
        os.environ,
        OPTIMIZERS="sgd,ssamf",
        SHORT_EPOCHS="1",
        SHORT_FLAGS="--amp bf16",
        OMP_NUM_THREADS="1",
        EXTRA="--dataset cifar10-subset --model wrn10-1 --train-size 128 --batch-size 64",
    )
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "scripts", "reproduce.py"),
            "cifar-short",
            "--runs-dir",
            str(tmp_path / "rep"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "reproduce_short.md").read_text()
    assert "1 epochs (the paper trains 200: not its recipe), amp bf16" in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][
        1:
    ]
    assert [row[0] for row in rows] == ["| sgd", "| ssamf 0.5", "| ssamf 0.9 tensor"]
    import json

    finals = {}  # the table's numbers are the runs' own: accuracy, ms/step, ratio to SGD (from final.json)
    for f in (json.loads(p.read_text()) for p in (tmp_path / "rep").rglob("final.json")):
        _, sparsity = methods.method_of(Config(**f["config"]))
        c = f["config"]
        structure = "" if c["structure"] == "unstructured" else c["structure"]
        finals[" ".join(str(v) for v in (c["optimizer"], sparsity, structure) if v)] = f
    assert {row[0][2:]: tuple(row[1:4]) for row in rows} == {
        n.replace(" unstructured", ""): (
            f"{100 * f['test_acc']:.2f} (1 seed)",
            f"{f['step_ms']:.1f}",
            f"{f['step_ms'] / finals['sgd']['step_ms']:.2f}",
        )
        for n, f in finals.items()
    }
    assert all("(1 seed)" in row[1] for row in rows) and table in r.stdout


def test_demo_prints_lambda1(tmp_path):
    import subprocess

    root = str(ROOT)
    cmd = [
        sys.executable,
        os.path.join(root, "train.py"),
        "--demo",
        "--epochs",
        "1",
        "--train-size",
        "128",
        "--batch-size",
        "32",
        "--out-dir",
        str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("│ ") and "%" in line]
    names = ["sgd", "sam", "ssamf", "ssamd", "ssamf-tensor-cost"]  # the last: cost-aware tensor masks, 0.9
    assert [row.split("│")[1].strip() for row in rows] == names
    assert "10,000 test images" not in r.stdout and "10000 test images" in r.stdout
    finals = [json.loads(f.read_text()) for f in tmp_path.glob("*/final.json")]
    label = {methods.method_of(Config(**f["config"]))[0]: f for f in finals}
    assert sorted(label) == sorted(names)
    for row in rows:  # each row's accuracy and lambda_1 are those of the run it names, recomputed here
        cells = [cell.strip() for cell in row.split("│")[1:-1]]
        final = label[cells[0]]
        model, c = sharpness.load_run(Path(final["config"]["out_dir"]) / "ckpt.pt", "cpu")
        x, y = sharpness.train_batch(c, 128, "cpu")
        lam = sharpness.top_eigenvalues(model, x, y, k=1, iters=demo.HVPS)[0]
        assert cells[2] == f"{100 * final['test_acc']:.1f}%"
        assert abs(float(cells[6]) - lam) <= 0.5 + 1e-3 * lam  # printed rounded to an integer
    assert "lower = flatter minimum" in r.stdout and "make bench-accuracy" in r.stdout
