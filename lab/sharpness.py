"""Top Hessian eigenvalues of a trained train.py checkpoint on a batch of training data (paper §5.3, Fig. 5):
lambda_1 and lambda_1 / lambda_5, by Lanczos with Hessian-vector products (double backward). Used by
train.py --demo (lambda_1 column), bench/accuracy.py and the command line bench/sharpness.py.

The model is in eval mode (BatchNorm uses its running statistics), so the loss is one fixed function of the
weights; the batch is a fixed random draw of training images, normalized, not augmented. The Hessian is over
all parameters. Lanczos with full reorthogonalization: `iters` Hessian-vector products give Ritz values whose
largest converge to the top eigenvalues first. Measured on a wrn10-1 checkpoint: with 20 products lambda_1..3
agree with 40 products to 4 digits and lambda_5 to 2%.
"""

import dataclasses

import torch
import torch.nn.functional as F

from lab.config import load_config
from lab.data import DATASETS, CifarOnDevice, normalize
from lab.models import make_model
from lab.runs import read_checkpoint


def hvp_operator(model, loss_fn, x, y):
    """v (flat) -> H v (flat), H = the Hessian of loss_fn(model(x), y) over model's parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    sizes = [p.numel() for p in params]

    def hvp(v):
        vs = [c.view_as(p) for c, p in zip(v.split(sizes), params)]
        hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv])

    return hvp, sum(sizes), params[0].dtype, params[0].device


def lanczos(hvp, n, iters, dtype=torch.float32, device="cpu", seed=0):
    """Eigenvalues of the iters x iters Lanczos tridiagonal T (Ritz values), largest first. Full
    reorthogonalization against all previous vectors keeps them orthogonal in floating point."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n, generator=g, dtype=dtype).to(device)
    Q = [q / q.norm()]
    alphas, betas = [], []
    for j in range(min(iters, n)):
        w = hvp(Q[j])
        alphas.append(torch.dot(w, Q[j]).item())
        V = torch.stack(Q)  # [j+1, n]
        for _ in range(2):  # w -= V^T (V w), twice ("twice is enough")
            w = w - V.t() @ (V @ w)
        beta = w.norm().item()
        if j == min(iters, n) - 1 or beta < 1e-8 * max(abs(a) for a in alphas):
            break  # done, or an invariant subspace: T is exact
        betas.append(beta)
        Q.append(w / beta)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(T).flip(0)


def top_eigenvalues(model, x, y, k=5, iters=30, loss_fn=F.cross_entropy, seed=0):
    hvp, n, dtype, device = hvp_operator(model, loss_fn, x, y)
    return lanczos(hvp, n, max(iters, k), dtype, device, seed)[:k].tolist()


def load_run(path, device):
    """A train.py checkpoint {"model": state_dict, "config": {...}} -> (model in eval mode, its Config).
    Read as data only (lab.runs.read_checkpoint, weights_only=True): a file that would run code when
    unpickled is refused with an error that names it."""
    ck = read_checkpoint(path, what="sharpness: ")
    c = load_config(ck["config"], path)
    data = DATASETS[c.dataset]
    model = make_model(c.model, data["classes"], small_images=data["side"] == 32)
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), c


def train_batch(c, n, device):
    """n images of the run's training set (its --train-size part, its --label-noise labels), the same fixed
    random draw for every run of that set (the files are sorted by class: the first n would be one class),
    normalized, not augmented, and their labels: the loss the run minimized, without augmentation."""
    if DATASETS[c.dataset]["loader"] is not CifarOnDevice:
        raise SystemExit(
            f"sharpness.py: {c.dataset} checkpoints are not supported (CIFAR data lives in memory here)"
        )
    data = CifarOnDevice(dataclasses.replace(c, batch_size=1), torch.device("cpu"), 0, 1)
    if n > len(data.train_y):
        raise SystemExit(
            f"sharpness.py: --batch {n} is larger than the run's {len(data.train_y)} training images"
        )
    idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))[:n]
    return normalize(data.train_x[idx].to(device)), data.train_y[idx].to(device)
