"""SAM / SSAM with Hugging Face accelerate: the ascent pass under no_sync, the descent pass under accumulate.

    python examples/accelerate_loop.py          # a tiny MLP on random data, on the CPU
    accelerate launch examples/accelerate_loop.py   # the same under DDP

accelerator.prepare wraps the SAM in an AcceleratedOptimizer: its step() calls SAM.step() without a closure,
which is the second step (w back, base step). The ascent pass runs under no_sync (eps from the local gradient,
no all-reduce: the paper's per-device ascent); the descent pass under accumulate(model), which all-reduces on
the k-th micro-batch only. accelerator.backward divides each loss by k: k micro-batches, one step.
SSAM-F's update_mask takes whatever data each process has: every process then holds rank 0's mask (ssam.py
broadcasts it), as SSAM-D's after each drop-and-grow.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator

import ssam


def train(model, opt, batches, k, fisher=None):
    """One SAM step per batch of `batches`, each split into k micro-batches; SSAM-F's Fisher from `fisher`
    (default: the step's batch) when a mask update is due. Returns the unwrapped model."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=k)
    model, opt = accelerator.prepare(model, opt)  # opt: AcceleratedOptimizer around the SAM
    sam = opt.optimizer
    for x, y in batches:
        if isinstance(sam, ssam.SSAMF) and sam.mask_update_due:  # the inner model: no DDP hooks
            sam.update_mask(accelerator.unwrap_model(model), fisher or [(x, y)])
        micro = list(zip(x.chunk(k), y.chunk(k)))
        with accelerator.no_sync(model):  # pass 1 at w: local gradients, no all-reduce
            for xm, ym in micro:
                accelerator.backward(F.cross_entropy(model(xm), ym))
        sam.first_step(zero_grad=True)  # w + eps
        with ssam.frozen_bn_stats(model):
            for xm, ym in micro:
                with accelerator.accumulate(model):  # pass 2: all-reduced on the k-th micro-batch
                    accelerator.backward(F.cross_entropy(model(xm), ym))
        opt.step()  # SAM.step(): w back exactly, then the base step
        opt.zero_grad()
    return accelerator.unwrap_model(model)


def main(steps=10, k=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = ssam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    model = train(model, opt, [(x, y)] * steps, k)
    print(f"loss {F.cross_entropy(model(x), y).item():.4f} after {opt.steps} steps")


if __name__ == "__main__":
    main()
