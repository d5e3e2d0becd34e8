"""SAM / SSAM in a plain loop with torch.amp: fp16 + GradScaler, bf16 autocast, fp32, gradient clipping.

    python examples/amp.py          # a tiny MLP on random data, fp16 GradScaler logic, on the CPU

One step (the same lines run fp32 or bf16 with GradScaler(enabled=False), where every scaler call is a no-op):

    scaler.scale(loss).backward()         pass 1 at w. Its gradient stays scaled: eps = rho * g / ||g|| does
                                          not depend on the scale.
    scaler.unscale_(opt.base_optimizer)   records an inf/NaN of pass 1 for scaler.update(), under the base
                                          optimizer's key; pass 2 unscales under opt's: never unscaled twice
    opt.first_step(zero_grad=True)        w -> w + eps; an inf/NaN in pass 1 gives eps = 0
    scaler.scale(loss2).backward()        pass 2 at w + eps
    scaler.unscale_(opt); clip            optional: clip the DESCENT gradient, unscaled (clipping before
                                          first_step changes nothing: eps is normalized, ||eps|| = rho)
    scaler.step(opt)                      opt.step(): w back exactly, then the base step; skipped (w exact)
                                          when either pass had an inf/NaN
    opt.restore()                         w exactly when scaler.step skipped the call (a no-op otherwise)
    scaler.update()                       an inf/NaN in either pass lowers the scale

SAM-k / LookSAM-k (ascent_every=k): when not opt.ascent_due, pass 1 is the step's only pass: clip if you
clip (after scaler.unscale_(opt)), scaler.step(opt) (opt.step(): the base step, with LookSAM's g_v added),
scaler.update(). An inf/NaN there skips the step as usual; the step is then not counted.

Under DDP with the ascent under no_sync, leave out the unscale_(opt.base_optimizer) line: its record is per
process, so the scales would drift apart. opt.step() all-reduces its skip decision, and pass 2 at w (eps = 0)
recomputes pass 1 on that process, so its overflow reaches every scaler through the all-reduced gradient.
"""

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

import ssam


def sam_step(model, opt, scaler, x, y, autocast=contextlib.nullcontext(), clip=None):
    """One SAM / SSAM-F / SSAM-D step (SSAM-F: call opt.update_mask when opt.mask_update_due, before)."""
    with autocast:
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()  # pass 1 at w
    if not opt.ascent_due:  # ascent_every=k: no ascent this step, pass 1 is the only pass
        return descend(model, opt, scaler, loss, clip)
    scaler.unscale_(opt.base_optimizer)  # its inf/NaN counts for update(); eps does not need it
    opt.first_step(zero_grad=True)  # w + eps (eps = 0 after an inf/NaN)
    with ssam.frozen_bn_stats(model), autocast:  # BatchNorm statistics follow pass 1 only
        loss2 = F.cross_entropy(model(x), y)
    scaler.scale(loss2).backward()  # pass 2 at w + eps
    if clip is not None:
        scaler.unscale_(opt)  # the descent gradient, unscaled once
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)  # opt.step(): restore w, base step; not called on an inf/NaN in pass 2
    opt.restore()  # w exactly if scaler.step skipped; no-op otherwise
    scaler.update()
    opt.zero_grad()
    return loss.detach()


def descend(model, opt, scaler, loss, clip=None):
    """A step between two ascents (SAM-k, LookSAM-k): the gradient of pass 1, unscaled, is the descent's."""
    if clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)  # opt.step() without first_step: the base step (LookSAM: with g_v); skipped on inf/NaN
    scaler.update()
    opt.zero_grad()
    return loss.detach()


def main(steps=20, dtype=torch.float16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = ssam.SSAMD(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, total_steps=steps, lr=0.1)
    # LookSAM-5: ssam.SAM(model.parameters(), torch.optim.SGD, ascent_every=5, looksam_alpha=0.7, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    autocast = torch.autocast("cpu", dtype=dtype)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    for _ in range(steps):
        loss = sam_step(model, opt, scaler, x, y, autocast, clip=1.0)
    print(f"loss {loss.item():.4f}, scale {scaler.get_scale()}, steps {opt.steps}")


if __name__ == "__main__":
    main()
