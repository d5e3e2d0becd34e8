"""Top Hessian eigenvalues of trained train.py checkpoints (paper §5.3, Fig. 5): lambda_1 and lambda_1 /
lambda_5 on a batch of training data, by Lanczos with Hessian-vector products. The code is lab/sharpness.py
(train.py --demo and bench/accuracy.py use it too); this is its command line.

    python bench/sharpness.py runs/cifar10-subset-sam-seed0/ckpt.pt                  # -> <run>/sharpness.json
    python bench/sharpness.py runs/*/ckpt.pt --batch 256 --iters 30                  # several runs, one table

The batch is --batch training images (a fixed random draw), normalized, not augmented, the model in eval mode.
With 20 products lambda_1..3 agree with 40 products to 4 digits and lambda_5 to 2% (a wrn10-1 checkpoint);
raise --iters when lambda_5 matters.
"""

import argparse
import json
import os
import time

import torch

from lab.methods import SPARSE
from lab.sharpness import load_run, top_eigenvalues, train_batch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="train.py ckpt.pt files")
    ap.add_argument(
        "--batch", type=int, default=128, help="training images the loss is taken over (default 128)"
    )
    ap.add_argument("--k", type=int, default=5, help="eigenvalues to report (default 5: lambda_1/lambda_5)")
    ap.add_argument(
        "--iters", type=int, default=20, help="Lanczos iterations = Hessian-vector products (default 20)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0, help="Lanczos start vector")
    ap.add_argument("--out", help="one JSON for all checkpoints (default: sharpness.json next to each)")
    args = ap.parse_args()
    results = []
    for path in args.checkpoints:
        t0 = time.perf_counter()
        model, cfg = load_run(path, args.device)
        x, y = train_batch(cfg, args.batch, args.device)
        eig = top_eigenvalues(model, x, y, args.k, args.iters, seed=args.seed)
        r = dict(
            checkpoint=path,
            model=cfg.model,
            optimizer=cfg.optimizer,
            sparsity=cfg.sparsity if cfg.optimizer in SPARSE else None,
            eigenvalues=eig,
            lambda_1=eig[0],
            lambda_1_over_lambda_k=eig[0] / eig[-1],
            k=args.k,
            batch=args.batch,
            iters=args.iters,
            seconds=time.perf_counter() - t0,
        )
        results.append(r)
        if not args.out:
            with open(os.path.join(os.path.dirname(path), "sharpness.json"), "w") as f:
                json.dump(r, f, indent=2)
        print(
            f"{path}: {cfg.optimizer}{'' if r['sparsity'] is None else ' s=%g' % r['sparsity']}  "
            f"lambda_1 {eig[0]:.4g}  lambda_1/lambda_{args.k} {r['lambda_1_over_lambda_k']:.3g}  "
            f"top {args.k}: {', '.join(f'{e:.4g}' for e in eig)}  ({r['seconds']:.0f} s)"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
