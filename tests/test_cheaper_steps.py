"""Cheaper SAM-type steps: the ascent pass on part of the batch (train.py --ascent-fraction) and cost-aware
whole-tensor masks. CPU only, tiny models."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ssam  # noqa: E402
import train  # noqa: E402

NO_AMP = torch.autocast("cpu", enabled=False)


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def make_opt(kind, model):
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    if kind == "sam":
        return ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, **sgd)
    return ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, structure="tensor", total_steps=10,
                      update_interval=2, seed=0, **sgd)


def reference_step(model, opt, x, y, k):
    """The two passes written out: the ascent on x[:k], the descent with frozen BN statistics on all of x."""
    with opt.ascent_pass() if hasattr(opt, "ascent_pass") else torch.enable_grad():
        F.cross_entropy(model(x[:k]), y[:k]).backward()
    opt.first_step(zero_grad=True)
    with ssam.frozen_bn_stats(model):
        F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def state(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


@pytest.mark.parametrize("kind", ["sam", "ssamd-tensor"])
@pytest.mark.parametrize("f", [1.0, 0.25])
def test_ascent_fraction_runs_the_first_pass_on_the_first_f_of_the_batch(kind, f):
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    a, b = convnet(), convnet()
    opt_a, opt_b = make_opt(kind, a), make_opt(kind, b)
    sizes = []
    hook = a[0].register_forward_hook(lambda m, inp, out: sizes.append(len(inp[0])))
    for _ in range(3):                                  # SSAM-D updates its mask at steps 0 and 2
        loss, out = train.train_step(a, opt_a, x, y, NO_AMP, ascent_fraction=f)
        reference_step(b, opt_b, x, y, round(f * 8))
    hook.remove()
    assert sizes == [round(f * 8), 8] * 3               # ascent on the sub-batch, descent on the whole batch
    assert out.shape == (round(f * 8), 10)              # train.py's accuracy counts the unperturbed pass's rows
    for s, t in zip(state(a), state(b)):                # weights, momentum-driven updates and BN running stats
        assert torch.equal(s, t)


def test_ascent_fraction_one_is_bit_identical_to_the_plain_step():
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    a, b = convnet(), convnet()
    opt_a, opt_b = make_opt("sam", a), make_opt("sam", b)
    for _ in range(2):
        train.train_step(a, opt_a, x, y, NO_AMP, ascent_fraction=1.0)
        train.train_step(b, opt_b, x, y, NO_AMP)
    for s, t in zip(state(a), state(b)):
        assert torch.equal(s, t)


def test_ascent_fraction_flag():
    cfg = train.resolve_config(train.get_args(["--optimizer", "sam", "--ascent-fraction", "0.25"]))
    assert cfg["ascent_fraction"] == 0.25 and "-f0.25-" in cfg["name"]
    assert train.resolve_config(train.get_args(["--optimizer", "sam"]))["ascent_fraction"] == 1.0
    assert "ascent_fraction" not in train.resolve_config(train.get_args([]))          # SGD: no ascent pass
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(SystemExit, match=rf"--ascent-fraction {float(bad)} is not in \(0, 1\]"):
            train.resolve_config(train.get_args(["--optimizer", "sam", "--ascent-fraction", bad]))


def test_train_runs_with_ascent_fraction(tmp_path):
    argv = ["--optimizer", "sam", "--ascent-fraction", "0.5", "--model", "wrn10-1", "--batch-size", "32",
            "--train-size", "96", "--epochs", "1", "--out-dir", str(tmp_path)]
    result = train.train(train.resolve_config(train.get_args(argv)), show_config=False)
    assert 0 <= result["train_acc"] <= 1 and result["config"]["ascent_fraction"] == 0.5
