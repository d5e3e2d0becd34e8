"""SAM / SSAM with gradient accumulation: k micro-batches, one step.

    python examples/accumulation.py          # a tiny MLP on random data, on the CPU

Semantics: each pass sums the micro-batch gradients of loss / k (equal micro-batches, a mean loss), so pass 1
gives the full batch's gradient at w (eps = rho * g / ||g|| from it; SSAM-D drops and grows from it) and
pass 2 the full batch's gradient at w + eps. Without BatchNorm that is one step on the full batch (rounding
of the sums aside); BatchNorm normalizes each micro-batch with its own statistics, as in any accumulated loop.
SSAM-F's Fisher is per sample: update_mask takes the micro-batches as they come. SAM-k / LookSAM-k
(ascent_every=k): when not opt.ascent_due, pass 1's accumulated gradient is the step's (opt.step()).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import ssam


def sam_step_accumulated(model, opt, micro_batches):
    """One SAM / SSAM-F / SSAM-D step over k micro-batches (SSAM-F: opt.update_mask when due, before)."""
    k = len(micro_batches)
    for x, y in micro_batches:  # pass 1 at w: the full batch's gradient
        (F.cross_entropy(model(x), y) / k).backward()
    if not opt.ascent_due:  # ascent_every: no ascent this step; the accumulated gradient at w descends
        opt.step()  # the base step (LookSAM: with g_v added)
        opt.zero_grad()
        return
    opt.first_step(zero_grad=True)  # w + eps, from the accumulated gradient
    with ssam.frozen_bn_stats(model):  # BatchNorm statistics follow pass 1 only
        for x, y in micro_batches:  # pass 2 at w + eps, the same micro-batches
            (F.cross_entropy(model(x), y) / k).backward()
    opt.second_step(zero_grad=True)  # w back exactly, then the base step


def main(steps=10, k=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = ssam.SSAMF(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, num_samples=16, lr=0.1)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    micro = list(zip(x.chunk(k), y.chunk(k)))
    for _ in range(steps):
        if opt.mask_update_due:
            opt.update_mask(model, micro)
        sam_step_accumulated(model, opt, micro)
    print(f"loss {F.cross_entropy(model(x), y).item():.4f} after {opt.steps} steps of {k} micro-batches")


if __name__ == "__main__":
    main()
