"""SSAM around timm's optimizer factory: its parameter groups (no weight decay on norms and biases) kept.

    python examples/timm_model.py          # timm's test_resnet (no pretrained weights), random data, CPU

create_optimizer_v2 returns a torch optimizer built over parameter groups; pass those groups and the optimizer
itself to SAM / SSAMF / SSAMD: the groups are shared, so each keeps its own weight_decay (and lr, for a
scheduler), and SSAM perturbs across all of them with one ||g|| (Eq. 2).
"""

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import ssam


def build(num_classes=4, kind="ssamd", total_steps=10):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)
    base = create_optimizer_v2(model, opt="momentum", lr=0.05, weight_decay=5e-4)  # groups: decay / no decay
    if kind == "sam":
        opt = ssam.SAM(base.param_groups, base, rho=0.05)
    else:
        opt = ssam.SSAMD(base.param_groups, base, rho=0.05, sparsity=0.5, total_steps=total_steps, seed=0)
    return model, opt


def sam_step(model, opt, x, y):
    F.cross_entropy(model(x), y).backward()  # pass 1 at w
    opt.first_step(zero_grad=True)
    with ssam.frozen_bn_stats(model):  # BatchNorm statistics follow pass 1 only
        F.cross_entropy(model(x), y).backward()  # pass 2 at w + eps
    opt.second_step(zero_grad=True)


def main(steps=5):
    torch.manual_seed(0)
    model, opt = build(total_steps=steps)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    for _ in range(steps):
        sam_step(model, opt, x, y)
    print([(g["weight_decay"], len(g["params"])) for g in opt.param_groups], f"density {opt.density():.2f}")


if __name__ == "__main__":
    main()
