"""Sparse SAM (Mi et al., NeurIPS 2022) in one file; needs torch only. README.md: usage, guarantees.
SAM climbs to w + eps, eps = rho * g / ||g|| (Eq. 2), and descends with the gradient found there; SSAM
perturbs only the entries a bool mask m selects, eps ⊙ m, m from the empirical Fisher (SSAM-F, Eq. 5-6) or
dropped and grown in training (SSAM-D, Eq. 7-9). Sections: SAM | masks | SSAM-F | SSAM-D | 2:4 | BatchNorm."""

import math
import re
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2: a DTensor's whole tensor


# ---- SAM (Foret et al. 2021), the frame SSAM's masks plug into -------------------------------------
class SAM(torch.optim.Optimizer):
    """SAM (Foret et al.): first_step climbs to w + eps, second_step goes back to w and steps base_optimizer.

    Args:
        params (iterable): parameters or param groups; a group may set its own rho and adaptive.
        base_optimizer: an Optimizer class, built here over the same groups with **kwargs, or an optimizer
            already built over the same parameters. Its param_groups are shared: schedulers just work.
        rho (float): ||eps||, the radius of the ascent (default 0.05).
        adaptive (bool): ASAM, eps scaled elementwise by w^2 (default False).
        ascent_every, looksam_alpha (int, float): the ascent every k steps, one pass and opt.step() between
            (default 1); alpha > 0: there LookSAM's g + alpha·||g||/||g_v||·g_v per tensor (Liu et al. 2022).
        **kwargs: the base optimizer's arguments (lr, momentum, ...) when base_optimizer is a class.
    """

    _COUNTERS = ("steps",)  # saved in state_dict()["counters"]; subclasses add theirs

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        ascent_every, looksam_alpha = kwargs.pop("ascent_every", 1), kwargs.pop("looksam_alpha", 0.0)
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho!r}")
        if not (isinstance(ascent_every, int) and ascent_every >= 1) or not 0 <= looksam_alpha < math.inf:
            raise ValueError(f"ascent_every={ascent_every} (int >= 1), looksam_alpha={looksam_alpha} (>= 0)")
        super().__init__(params, dict(rho=rho, adaptive=adaptive))
        if isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            base_optimizer, kwargs = base_optimizer(self.param_groups, **kwargs), {}
        ours = {id(p) for g in self.param_groups for p in g["params"]}
        theirs = {id(p) for g in getattr(base_optimizer, "param_groups", ()) for p in g["params"]}
        if not isinstance(base_optimizer, torch.optim.Optimizer) or kwargs or theirs != ours:
            raise ValueError(
                f"base_optimizer must be an Optimizer class, or one over the same parameters "
                f"(not other parameters), no kwargs: got {base_optimizer!r}, {sorted(kwargs)}"
            )
        sharded = {hasattr(p, "device_mesh") for g in self.param_groups for p in g["params"]}
        if len(sharded) > 1 or (looksam_alpha and True in sharded):
            raise ValueError("FSDP2 (DTensor) parameters: all or none, and not with looksam_alpha")
        self.base_optimizer = base_optimizer
        self.param_groups = self.base_optimizer.param_groups  # one set of groups: schedulers just work
        for group in self.param_groups:  # rho and adaptive per group, as davda54's
            group.update(rho=group.get("rho", rho), adaptive=group.get("adaptive", adaptive))
        self.defaults.update(self.base_optimizer.defaults)
        self.steps = 0  # completed steps (second_step calls and steps between ascents)
        self.norm = "full"  # eps normalized by ||g|| over all parameters, as Eq. 2
        self._w = None  # the weights w while the model sits at w + eps
        self.ascent_every, self.looksam_alpha, self._g = ascent_every, looksam_alpha, None  # _g: LookSAM's g

    @property
    def ascent_due(self):  # this step climbs to w + eps (two passes); else one pass at w, then opt.step()
        return self.steps % self.ascent_every == 0

    def _mask_for_step(self, params, grads):
        return None  # dense SAM; the SSAM classes return (and update) their masks

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        """w <- w + eps, eps = rho * g / ||g|| (Eq. 2) ⊙ m (Alg. 1, line 9); p.grad becomes eps in place."""
        if self._w is not None:
            raise ValueError("first_step called twice: the weights are already perturbed; call second_step()")
        if not self.ascent_due:
            raise ValueError(f"no ascent at step {self.steps} (opt.ascent_due): one pass, then opt.step()")
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        params = [p for _, ps in groups for p in ps]
        grads = [p.grad for p in params]
        if not params:
            raise ValueError("no gradients: run loss.backward() first, or step(closure, both_passes=True)")
        _refuse_sparse(params)
        masks = self._mask_for_step(params, grads)  # may raise (SSAMF without a mask): nothing changed yet
        self._g = (params, [g.clone() for g in grads]) if self.looksam_alpha else None  # LookSAM: g at w
        if masks is not None and self.norm == "masked":
            torch._foreach_mul_(grads, masks)  # g ⊙ m, normalized by its own norm below
        ada = [p for g, ps in groups if g["adaptive"] for p in ps]
        if ada:  # ASAM: eps = rho * w^2 g / ||w g||
            torch._foreach_mul_([p.grad for p in ada], ada)
        norms = [n.to(params[0].device) for n in torch._foreach_norm(grads)]
        norm = torch.linalg.vector_norm(torch.stack(norms))  # ||g||_2 over all parameters
        for g, ps in groups:  # Eq. 2: rho / ||g||; rho may differ between groups
            if ps:
                torch._foreach_mul_([p.grad for p in ps], (g["rho"] / (norm + 1e-12)).to(ps[0].device))
        if ada:
            torch._foreach_mul_([p.grad for p in ada], ada)
        if masks is not None and self.norm == "full":
            torch._foreach_mul_(grads, masks)  # eps ⊙ m (Alg. 1, line 9)
        finite = torch.isfinite(norm)  # a tensor: no host sync
        for eps in grads:  # non-finite ||g||: eps = 0 (eps * 0 would keep a NaN)
            eps.masked_fill_(~finite, 0.0)
        w = [p.to_local() for p in params] if hasattr(params[0], "to_local") else params  # FSDP2: shards
        saved = [torch.empty_like(t) for t in w]
        torch._foreach_copy_(saved, w)  # w, to come back to exactly
        self._w, self._finite = (w, saved), torch.isfinite(_full(norm))  # FSDP2: a plain bool
        torch._foreach_add_(params, grads)  # climb to w + eps
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self):  # back to exactly w: a copy, not a subtraction; no-op when not perturbed
        if self._w is not None:
            torch._foreach_copy_(*self._w)
            self._w = self._g = None

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        if self._w is None:
            raise ValueError("second_step called without first_step: the weights are not perturbed")
        if self._g is not None and all(p.grad is not None for p in self._g[0]):  # None: GradScaler's skip
            (params, g), g_s = self._g, [p.grad for p in self._g[0]]  # LookSAM (Alg. 1), per tensor:
            n2 = [n.square().clamp_min(1e-30) for n in torch._foreach_norm(g)]  # g_v = g_s - c g, c = g_s·g
            c = [-(a * b).sum() / n for a, b, n in zip(g_s, g, n2)]  # / ||g||^2: g_s's part orthogonal to g
            torch._foreach_mul_(g, c)
            torch._foreach_add_(g, g_s)  # g is g_v now
            for state in self.state.values():
                state.pop("g_v", None)
            for p, v, ci in zip(params, g, c):  # pass 1 overflowed: g_v = 0, plain steps until the next
                self.state[p]["g_v"] = v.masked_fill_(~torch.isfinite(ci), 0.0)
            group, dist = getattr(self, "process_group", None), torch.distributed  # SSAM's; SAM: the default
            if dist.is_available() and dist.is_initialized() and group is not False:  # local ascents (DDP):
                for v in g:  # one g_v, the mean over the processes, on every process
                    dist.all_reduce(v.div_(dist.get_world_size(group)), group=group)
        self.restore()
        self.base_optimizer.step()
        self.steps += 1
        if zero_grad:
            self.zero_grad()

    def _step_between_ascents(self):  # Alg. 1 per tensor: g + alpha·||g||/||g_v||·g_v (SAM-k: g), base step
        params = [p for p, state in self.state.items() if "g_v" in state and p.grad is not None]
        if params:
            grads, g_v = [p.grad for p in params], [self.state[p]["g_v"] for p in params]
            gn, vn = torch._foreach_norm(grads), torch._foreach_add(torch._foreach_norm(g_v), 1e-12)
            torch._foreach_addcmul_(grads, g_v, torch._foreach_div(gn, vn), value=self.looksam_alpha)
        self.base_optimizer.step()
        self.steps += 1

    @torch.no_grad()
    def step(self, closure=None, both_passes=False):
        """davda54's: first_step, closure() (forward + backward) at w + eps, second_step; both_passes: at w"""
        if closure is None and self._w is None and not self.ascent_due:
            return self._step_between_ascents()  # the caller's one pass at w
        if closure is None:  # scaler.step(opt), HF Trainer, accelerate: the second step
            if self._w is None:
                message = "SAM.step needs a closure, or first_step() first (torch: pass opt.base_optimizer)"
                raise ValueError(message)
            finite = self._finite.float()  # pass 1 overflowed: restore w, skip the base step (a sync)
            if torch.distributed.is_available() and torch.distributed.is_initialized():  # local ascents:
                torch.distributed.all_reduce(finite, torch.distributed.ReduceOp.MIN)  # one decision for all
            return self.second_step() if finite else self.restore()
        closure = torch.enable_grad()(closure)
        if both_passes:
            self.zero_grad()
            loss = closure()
        if not self.ascent_due:  # no second pass: one step from the pass at w (both_passes', or the caller's)
            self._step_between_ascents()
            return loss if both_passes else None
        self.first_step(zero_grad=True)
        try:
            loss2 = closure()
        except BaseException:
            self.restore()
            self.zero_grad()
            raise
        self.second_step()
        return loss if both_passes else loss2

    def state_dict(self):  # + the base optimizer's state (momentum) and the counters
        if self._w is not None:
            raise ValueError("state_dict() while the weights are perturbed: call second_step() or restore()")
        counters = {k: getattr(self, k) for k in self._COUNTERS}  # SSAMD's generator: its state
        counters = {k: v.get_state() if isinstance(v, torch.Generator) else v for k, v in counters.items()}
        return dict(super().state_dict(), base=self.base_optimizer.state_dict(), counters=counters)

    def load_state_dict(self, state_dict):  # ours, or davda54/sam's (with a warning)
        if not {"base", "counters"} <= state_dict.keys():  # or a framework's that dropped them
            if "param_groups" not in state_dict:
                raise ValueError(f"not an optimizer state_dict: keys {sorted(state_dict)}, no 'param_groups'")
            if any("mask" in s for s in state_dict.get("state", {}).values()):  # an SSAM's, cut down
                raise ValueError(
                    "an SSAM state_dict without 'base' and 'counters' (torch's get_state_dict keeps only "
                    "'state' and 'param_groups'): save opt.state_dict() whole, or as fsdp_checkpoint.py does"
                )
            missing = sorted({"base", "counters"} - state_dict.keys())
            message = f"no {missing} in state_dict: only groups load; no base-optimizer state, counters at 0"
            warnings.warn(message, stacklevel=2)
            self.base_optimizer.load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        else:
            state_dict = dict(state_dict)
            base, counters = state_dict.pop("base"), state_dict.pop("counters")
            super().load_state_dict(state_dict)
            self.base_optimizer.load_state_dict(base)
            for k, v in counters.items():
                if k == "generator":  # SSAMD's generator takes its state back
                    self.generator.set_state(v)
                else:
                    setattr(self, k, v)
        self.param_groups = self.base_optimizer.param_groups  # loading replaced the list: share it again


def _refuse_sparse(params):  # eps and the Fisher need dense gradients
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError(f"a sparse gradient ({tuple(p.shape)}): SAM needs nn.Embedding(sparse=False)")


# ---- Mask helpers: global top-k (Eq. 6, Alg. 2), N:M groups along the output axis, whole tensors ---
def nm_mask(score, n, m):
    """Top n of every m consecutive outputs per input: W [out, in, *k] as W^T [in*k, out] of dX = dY W §4.1"""
    if score.shape[0] % m:
        raise ValueError(f"nm_mask: {tuple(score.shape)}: the first dimension is no multiple of m={m}")
    wt = score.reshape(score.shape[0], -1).t()  # [in*k, out]
    groups = wt.reshape(wt.shape[0], -1, m)  # [in*k, out/m, m]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(wt.shape).t().reshape(score.shape)


def topk_masks(scores, k, largest=True):
    """Bool masks of the k largest (or smallest) entries across all tensors in `scores` (ArgTopK, Eq. 6)."""
    flat = torch.cat([s.reshape(-1).to(scores[0].device) for s in scores])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(k, largest=largest, sorted=False).indices] = True
    return [m.reshape(s.shape).to(s.device) for m, s in zip(keep.split([s.numel() for s in scores]), scores)]


def ascent_costs(model, *inputs):
    """{parameter: (forward, later layers' input grads, its weight grad)} in multiply-adds, from one forward.
    A layer's place is its first call's start: a parameter a container holds (a ViT's pos) counts from it."""
    order, macs = {}, {}

    def count(m, args, out):  # multiply-adds per output: a Linear row, a conv window, else elementwise
        rows = m.weight[0].numel() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) else 1
        macs[m] = macs.get(m, 0) + (out[0] if isinstance(out, tuple) else out).numel() * rows

    mods = [m for m in model.modules() if list(m.parameters(recurse=False))]
    place = lambda m, _: order.update({m: order.get(m, len(order))})  # noqa: E731 (a hook returns None)
    hooks = [h for m in mods for h in (m.register_forward_pre_hook(place), m.register_forward_hook(count))]
    try:
        with torch.no_grad(), frozen_bn_stats(model):
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    costs = {}
    for m in order:
        own = list(m.parameters(recurse=False))
        later = sum(f for k, f in macs.items() if order[k] > order[m])  # input grads of the layers after m
        for p in own:  # its weight gradient: its share of the layer's multiply-adds
            costs[p] = (sum(macs.values()), later, macs[m] * p.numel() / sum(q.numel() for q in own))
    return costs


def cost_tensor_masks(scores, density, costs, by_count=False):
    """Whole tensors by value per ascent cost. A cut is the lowest layer the ascent's backward may reach;
    for each cut, fill from the tensors above it, best mean score first, taking a tensor if that brings the
    count nearer density·|w|. Fills within 25% of density·|w| are "near"; of those, the most value (score
    mass; by_count: entries) per multiply-add of the ascent (costs) wins; if none is near, the nearest."""
    sizes, (fwd, dx, dw) = [s.numel() for s in scores], zip(*costs)
    mean = torch.stack([s.float().mean().to(scores[0].device) for s in scores]).tolist()  # one sync
    budget, fills = round(density * sum(sizes)), []
    ranked = sorted(range(len(scores)), key=lambda i: -mean[i])
    for cut in sorted(set(dx)):
        room, take = budget, []
        for i in ranked:
            if dx[i] <= cut and sizes[i] < 2 * room:  # nearer to the budget with tensor i than without
                take, room = take + [i], room - sizes[i]
        cost = max(fwd) + max((dx[i] for i in take), default=0) + sum(dw[i] for i in take)
        value = sum(sizes[i] * (1 if by_count else mean[i]) for i in take)
        per_cost = value / (cost or 1)  # every cost 0: by value
        fills.append(dict(take=take, near=abs(room) <= budget / 4, value_per_cost=per_cost, room=room))
    near = [f for f in fills if f["near"]]  # of those, the most value per cost (ties: the shallowest cut)
    best = max(near, key=lambda f: f["value_per_cost"]) if near else min(fills, key=lambda f: abs(f["room"]))
    return [torch.full_like(s, i in best["take"], dtype=torch.bool) for i, s in enumerate(scores)]


def select_masks(scores, density, nm=None, by_tensor=False, costs=None, by_count=False):
    """Masks at density (Eq. 6): N:M (nm=(n, m)) where a tensor holds the pattern, else one global top-k;
    by_tensor: whole tensors (cost_tensor_masks, with costs if given)."""
    if by_tensor:
        return cost_tensor_masks(scores, density, costs or [(1, 0, 0)] * len(scores), by_count)
    fits = [nm and s.dim() > 1 and s.shape[0] % nm[1] == 0 for s in scores]  # it holds the N:M pattern
    masks = [nm_mask(s, *nm) if fit else None for s, fit in zip(scores, fits)]
    pooled = [i for i, mk in enumerate(masks) if mk is None]
    if pooled:
        k = round(density * sum(scores[i].numel() for i in pooled))
        for i, mk in zip(pooled, topk_masks([scores[i] for i in pooled], k)):
            masks[i] = mk
    return masks


class _SparseSAM(SAM):
    """SSAM-F's and SSAM-D's frame: bool masks opt.state[p]["mask"] for opt.masked, schedule, checks."""

    _COUNTERS = ("steps", "last_mask_update")

    def __init__(
        self, params, base, sparsity=0.5, update_interval=1000, structure=None, norm=None, costs=None, **kw
    ):
        if not 0 <= sparsity <= 1:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
        if not (isinstance(update_interval, int) and update_interval >= 1):
            raise ValueError(f"update_interval must be an integer >= 1 (steps), got {update_interval!r}")
        n, m = map(int, structure.split(":")) if re.fullmatch(r"\d+:\d+", str(structure)) else (0, 0)
        if not (0 < n <= m or structure in (None, "unstructured", "tensor")):
            raise ValueError(f"unknown structure {structure!r}: use None, 'tensor' or 'N:M' with 0 < N <= M")
        if n and not math.isclose(sparsity, 1 - n / m):  # N:M fixes the density at N/M
            raise ValueError(f"structure {structure!r} needs sparsity={1 - n / m:g}, got {sparsity!r}")
        self.nm = (n, m) if n else None  # N:M masks
        self.by_tensor = structure == "tensor"  # whole-tensor masks
        norm = norm or ("masked" if self.by_tensor else "full")
        if norm not in ("full", "masked") or (self.by_tensor and norm != "masked"):
            raise ValueError(
                f"norm={norm!r} not allowed: use 'full' (||g||, the paper) or 'masked' "
                "(||g ⊙ m||); structure='tensor' needs 'masked': others get no ascent gradient"
            )
        if costs is not None and not self.by_tensor:
            raise ValueError("costs= picks whole tensors by their ascent cost: it needs structure='tensor'")
        self.process_group = kw.pop("process_group", None)  # None: the default group; False: none
        super().__init__(params, base, **kw)  # rho, adaptive, the base optimizer's arguments
        self.sparsity, self.structure, self.norm = sparsity, structure, norm
        self.update_interval = update_interval
        self.masked = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not self.masked:
            raise ValueError("every parameter has requires_grad=False: there is nothing to train or perturb")
        self.size = sum(p.numel() for p in self.masked)  # |w|: the trainable entries
        if costs is not None and not any(p in costs for p in self.masked):
            raise ValueError("costs= holds none of these parameters: ascent_costs(model, x) of their model")
        self.costs = costs and [costs.get(p, (0, 0, 0)) for p in self.masked]  # None: the paper's ranking
        self.last_mask_update = -1  # step of the last mask update; -1: never
        self._unperturbed = []  # structure='tensor': the tensors ascent_pass() freezes

    def _select(self, scores, by_count=False):  # masks at density 1 - s in this optimizer's structure
        return select_masks(scores, 1 - self.sparsity, self.nm, self.by_tensor, self.costs, by_count)

    @property
    def mask_update_due(self):  # before the first mask, then every update_interval steps
        return self.last_mask_update < 0 or self.steps - self.last_mask_update >= self.update_interval

    def masks(self):
        return [self.state[p]["mask"] for p in self.masked]

    def density(self):  # fraction of the trainable entries perturbed (1 - s); syncs: for logging
        return sum(int(_full(m).sum()) for m in self.masks()) / self.size

    def _synced(self):  # processes that hold one mask by a broadcast: torch.distributed on, unsharded
        dist, group = torch.distributed, self.process_group
        unsharded = group is not False and not hasattr(self.masked[0], "device_mesh")  # FSDP2: set_masks
        return unsharded and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1

    def _rank0(self, masks):
        """Rank 0's masks on every process of the group (one broadcast); other shapes: ValueError, no hang."""
        dist, group, device = torch.distributed, self.process_group, masks[0].device
        shapes = hash(tuple(tuple(m.shape) for m in masks)) % 2**62  # the same number on every process
        span = torch.tensor([shapes, -shapes], device=device)
        dist.all_reduce(span, dist.ReduceOp.MAX, group=group)
        if span.sum() != 0:
            raise ValueError("mask shapes differ across processes (pipeline?): pass process_group=, or False")
        flat = torch.cat([m.reshape(-1).to(device) for m in masks]).to(torch.uint8)  # gloo has no bool
        dist.broadcast(flat, 0 if group is None else dist.get_global_rank(group, 0), group=group)
        flat = flat.split([m.numel() for m in masks])
        return [f.view(m.shape).to(m.device, torch.bool) for f, m in zip(flat, masks)]

    def set_masks(self, masks, count_update=True):  # bool, one per opt.masked; also masks of your own
        if self._synced():  # DDP, accelerate, Lightning: every process takes rank 0's masks
            masks = self._rank0(masks)
        if self.by_tensor:
            self._unperturbed = [p for p, mk in zip(self.masked, masks) if not mk.any()]  # sync: per update
        for p, mk in zip(self.masked, masks):  # FSDP2: every rank has the whole mask and keeps its shard
            if hasattr(p, "device_mesh"):  # a DTensor mask in any placements, or a plain tensor: rank 0's
                mk = torch.distributed.tensor.distribute_tensor(_full(mk), p.device_mesh, p.placements)
            self.state[p]["mask"] = mk
        if count_update:
            self.last_mask_update = self.steps

    def _mask_for_step(self, params, grads):
        if self.last_mask_update < 0:
            raise ValueError("no mask yet: call opt.update_mask(model, data) first (if opt.mask_update_due)")
        if any("mask" not in self.state.get(p, ()) for p in params):
            raise ValueError("a parameter frozen when opt was built has a gradient: rebuild after unfreezing")
        return [self.state[p]["mask"] for p in params]

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # which casts masks to the parameter dtype: back to bool
        if self.last_mask_update >= 0:
            self.set_masks([m.bool() for m in self.masks()], count_update=False)

    @contextmanager
    def ascent_pass(self):  # around the FIRST pass: structure='tensor' freezes unperturbed tensors
        frozen = [p.requires_grad_(False) for p in self._unperturbed if p.requires_grad]
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)


# ---- SSAM-F: the mask from the empirical Fisher (Eq. 3-6, Alg. 2 Option I) -------------------------
@torch.enable_grad()
def empirical_fisher(model, data, num_samples, loss_fn=None):
    """Eq. 5: {parameter: sum over the first num_samples samples of `data` of the squared per-sample gradient}
    for every trainable parameter (the 1/N_F does not change the ranking). One sample at a time, as the
    authors' loop: exact for any model. Train-mode BatchNorm normalizes each sample alone, updates nothing."""
    params = [p for p in model.parameters() if p.requires_grad]
    device, fsdp, grads = params[0].device, hasattr(params[0], "device_mesh"), [p.grad for p in params]
    fisher, seen, check = [torch.zeros_like(p) for p in params], 0, torch.zeros((), device=device)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)]
    for m in bns:
        m.forward = lambda a, m=m: _bn_one_sample(m, a)
    try:
        for batch in data:
            for x, y in _one_sample_batches(batch, device, num_samples - seen):
                model.zero_grad()  # backward fills p.grad afresh (the caller's come back below)
                hf = y is None  # HF: model(**x), the loss in its output or loss_fn(out, x)
                out = model(**x) if hf else model(x)
                if loss_fn is not None:
                    loss = loss_fn(out, x if hf else y)
                else:
                    loss = out["loss"] if hf else F.cross_entropy(out, y)
                loss.backward()  # FSDP2: the mean over ranks, this sample's gradient if every rank has it
                _refuse_sparse(params)
                check += loss.detach() * (seen + 1)  # FSDP2: compared below
                g = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
                torch._foreach_addcmul_(fisher, g, g)  # Eq. 5: sum_i g_i^2
                seen += 1
            if seen >= num_samples:
                break
    finally:
        for m in bns:
            del m.forward  # back to the class's forward
        for p, gr in zip(params, grads):
            p.grad = gr
    if fsdp:  # the same samples on every rank: max - min over ranks of check = 0
        torch.distributed.all_reduce(span := torch.stack([check, -check]), torch.distributed.ReduceOp.MAX)
        if span.sum() > 1e-6 * span[0].abs():
            raise ValueError("FSDP2: the Fisher samples differ between ranks: pass the same data to all")
    if seen < num_samples:
        raise ValueError(f"data gave {seen} samples but num_samples={num_samples}: pass more data")
    return {p: _full(f) for p, f in zip(params, fisher)}  # FSDP2: whole tensors, the same on every rank


def _one_sample_batches(batch, device, most):
    """Up to `most` batches of one sample: (x, y) from an (inputs, targets) batch; (dict, None) from HF's
    dict of tensors, each sample with its own attention_mask row."""
    if hasattr(batch, "keys"):  # a dict, or a transformers BatchEncoding
        n = min(len(next(iter(batch.values()))), most)
        return [({k: v[i : i + 1].to(device) for k, v in batch.items()}, None) for i in range(n)]
    x, y = batch[0], batch[1]
    return [(x[i : i + 1].to(device), y[i : i + 1].to(device)) for i in range(min(len(y), most))]


def _bn_one_sample(m, a):
    """Train-mode BatchNorm of one sample: its own statistics, or the running ones at one value a channel."""
    if a[0, 0].numel() > 1:
        return F.instance_norm(a, weight=m.weight, bias=m.bias, eps=m.eps)
    if m.running_mean is None:
        raise ValueError(
            f"{m} sees [B, C] inputs and has no running statistics to normalize one sample "
            "(Fisher): build it with track_running_stats=True"
        )
    return F.batch_norm(a, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


class SSAMF(_SparseSAM):
    """SSAM-F: perturb the (1-s)·|w| entries of largest empirical Fisher (Eq. 6). Call
    opt.update_mask(model, data) whenever opt.mask_update_due, before the first pass.

    Args:
        params, base_optimizer, rho, adaptive, **kwargs: as SAM's.
        sparsity (float): s, the share of trainable entries left unperturbed (default 0.5).
        num_samples (int): N_F of Eq. 5, the samples the Fisher sums over (default 128).
        update_interval (int): steps between mask updates (default 1000).
        structure (str): None (element-wise), "N:M" such as "2:4" (then sparsity = 1 - N/M), or "tensor"
            (whole tensors; `with opt.ascent_pass():` around the first pass then saves work) (default None).
        norm (str): "full", eps normalized by ||g|| as the paper, or "masked", by ||g ⊙ m||; None: "masked"
            for structure="tensor" (which needs it), else "full" (default None).
        costs (dict): ascent_costs(model, x), with structure="tensor": tensors by score per cost (default
            None: by score).
        process_group: with torch.distributed initialized and parameters not sharded (DDP, accelerate,
            Lightning "ddp"), every process of this group takes rank 0's mask at each update, one broadcast
            (default None: the default group); False: each process keeps its own (pipeline, tensor parallel).
    """

    def __init__(self, params, base_optimizer, rho=0.05, sparsity=0.5, num_samples=128, **kwargs):
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        super().__init__(params, base_optimizer, rho=rho, sparsity=sparsity, **kwargs)
        self.num_samples = num_samples

    @torch.no_grad()
    def update_mask(self, model, data, loss_fn=None):
        """The Fisher of num_samples samples of `data`, (inputs, targets) batches (Eq. 5); top-k (Eq. 6)."""
        if isinstance(model, nn.parallel.DistributedDataParallel):  # its backward all-reduces
            raise ValueError("update_mask needs the inner model: pass model.module, not the DDP wrapper")
        fisher = empirical_fisher(model, data, self.num_samples, loss_fn)
        if any(p not in fisher for p in self.masked):
            raise ValueError("some parameters are not trainable ones of `model`: pass theirs (DDP: .module)")
        self.set_masks(self._select([fisher[p] for p in self.masked]))


# ---- SSAM-D: the mask from dynamic sparse training (Eq. 7-9, Alg. 2 Option II) ---------------------
class SSAMD(_SparseSAM):
    """SSAM-D: a random mask at density 1-s (Alg. 1 line 1), dropped and grown every update_interval steps
    inside first_step with that step's gradient (Eq. 7-9): nothing to call.

    Args:
        params, base_optimizer, rho, adaptive, **kwargs: as SAM's.
        sparsity, update_interval, structure, norm, costs, process_group: as SSAMF's (costs weigh entries:
            a random mask has no Fisher mass).
        drop_rate (float): alpha of Eq. 9, the largest share of the mask redrawn at once (default 0.5).
        total_steps (int): T of Eq. 9, the run's number of steps (required).
        seed (int): seed of the mask's own generator, saved in state_dict; None: drawn from torch's.
    """

    _COUNTERS = _SparseSAM._COUNTERS + ("generator",)

    def __init__(
        self, params, base_optimizer, rho=0.05, sparsity=0.5, drop_rate=0.5, total_steps=None, **kwargs
    ):
        seed = kwargs.pop("seed", None)
        if not 0 <= drop_rate <= 1:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate!r}")
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"total_steps must be the run's number of steps (int >= 1), got {total_steps!r}")
        super().__init__(params, base_optimizer, rho=rho, sparsity=sparsity, **kwargs)
        self.drop_rate, self.total_steps = drop_rate, total_steps
        self.generator = torch.Generator(device=self.masked[0].device)
        self.generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
        rand = [self._rand(p) for p in self.masked]  # Alg. 1 line 1: a random mask
        self.set_masks(self._select(rand, by_count=True))

    def _rand(self, p):  # uniform [0, 1) scores; structure='tensor': one draw per tensor
        shape = () if self.by_tensor else p.shape
        gen = self.generator
        return torch.rand(shape, generator=gen, device=gen.device).to(p.device).expand(p.shape)

    def drop_count(self, t):
        """N_drop = f_decay(t; alpha)·(1-s)·|w| (Alg. 2 line 8, Eq. 9), |w| counting trainable entries."""
        f_decay = self.drop_rate / 2 * (1 + math.cos(t * math.pi / self.total_steps))
        return int(f_decay * (1 - self.sparsity) * self.size)

    @torch.no_grad()
    def drop_and_grow(self, grads):
        """One drop-and-grow round (Eq. 7-8) with `grads`, one per parameter of opt.masked (None: zero)."""
        masks = [_full(m) for m in self.masks()]  # FSDP2: whole tensors, as below
        g = [_full(torch.zeros_like(p) if gr is None else gr) for p, gr in zip(self.masked, grads)]
        # Eq. 7: drop the n_drop perturbed entries of smallest |g|, keep the rest (whole tensors: by mean |g|)
        keep = (int(sum(m.sum() for m in masks)) - self.drop_count(self.steps)) / self.size
        keep_scores = [torch.where(m, gr.abs(), -math.inf) for m, gr in zip(masks, g)]
        kept = select_masks(keep_scores, max(keep, 0), by_tensor=self.by_tensor)  # N:M: the grow restores it
        kept = [k & m for k, m in zip(kept, masks)]
        # Eq. 8: grow at random among the unperturbed: kept entries score 2, the rest uniform in [0, 1)
        grow_scores = [torch.where(k, 2.0, self._rand(p)) for k, p in zip(kept, self.masked)]
        self.set_masks(self._select(grow_scores, by_count=True))

    def _mask_for_step(self, params, grads):
        if self.mask_update_due and self._all_finite(grads):  # GradScaler's inf/NaN: the next finite step
            self.drop_and_grow([p.grad for p in self.masked])
        return super()._mask_for_step(params, grads)

    def _all_finite(self, grads):  # ||g|| finite on every process (a sync; at due updates only)
        norms = torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads)])
        finite = torch.isfinite(_full(torch.linalg.vector_norm(norms))).float()  # FSDP2: all of g
        if self._synced():
            torch.distributed.all_reduce(finite, torch.distributed.ReduceOp.MIN, group=self.process_group)
        return bool(finite)


# ---- The 2:4 sparse backward ("implicit" SSAM): dX = dY·(W ⊙ M) in the ascent pass of nn.Linear layers
class _MaskedInputGrad(torch.autograd.Function):
    """y = x W^T + b; backward dX = dY (W ⊙ M), dW = dY^T X, db = sum dY. Under autocast in its dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask):
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, weight, bias = x.to(dt), weight.to(dt), None if bias is None else bias.to(dt)
        ctx.save_for_backward(x, weight, mask)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight, mask = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1]).to(weight.dtype)
        need_x, _, need_b, _ = ctx.needs_input_grad
        gx = sparse_input_grad(gy2, weight, mask).reshape(*gy.shape[:-1], -1) if need_x else None
        return gx, gy2.t() @ x.reshape(-1, x.shape[-1]), gy2.sum(0) if need_b else None, None


def sparse_input_grad(gy, weight, mask):
    """dX = dY (W ⊙ M), dY [B, out]: on CUDA in fp16/bf16 via 2:4 sparse tensor cores, elsewhere dense."""
    wm = weight * mask
    if wm.is_cuda and wm.dtype in (torch.float16, torch.bfloat16):
        try:
            return semi_structured_mm(gy, wm)
        except (RuntimeError, ValueError, NotImplementedError):
            pass  # the kernel refuses this shape or GPU: the dense product
    return gy @ wm


def semi_structured_mm(gy, wm):
    """dY (W ⊙ M) on 2:4 sparse tensor cores; W moves every step, so (W ⊙ M)^T is compressed every step."""
    wt = torch.sparse.to_sparse_semi_structured(wm.t().contiguous())  # [in, out]
    return (wt @ gy.t().contiguous()).t()


@contextmanager
def sparse_ascent(model, opt):
    """Around the FIRST pass: nn.Linear layers with an N:M mask in `opt` take dX = dY·(W ⊙ M), so the layers
    below see dY through W ⊙ M (the TPAMI follow-up's "implicit" SSAM). Yields the patched layers."""
    if not isinstance(getattr(opt, "nm", None), tuple) or hasattr(opt.masked[0], "device_mesh"):
        raise ValueError("sparse_ascent needs SSAMF/SSAMD, structure='N:M' ('2:4'), unsharded (not FSDP2)")
    lins = [m for m in model.modules() if isinstance(m, nn.Linear) and "mask" in opt.state.get(m.weight, ())]
    patched = [m for m in lins if m.weight.shape[0] % opt.nm[1] == 0]  # N:M masks, not the pooled top-k
    for m in patched:
        m.forward = lambda x, m=m: _MaskedInputGrad.apply(x, m.weight, m.bias, opt.state[m.weight]["mask"])
    try:
        yield patched
    finally:
        for m in patched:
            del m.forward  # back to nn.Linear.forward


# ---- BatchNorm: running statistics follow the first pass only --------------------------------------
@contextmanager
def frozen_bn_stats(model):
    """Around the SECOND pass: train-mode BatchNorm/InstanceNorm normalize by batch statistics, update none"""
    bns = [m for m in model.modules() if isinstance(m, _NormBase) and m.training and m.track_running_stats]
    stats = [(m.running_mean, m.running_var) for m in bns]
    for m in bns:  # no running statistics to update or count
        m.track_running_stats, m.running_mean, m.running_var = False, None, None
    try:
        yield
    finally:
        for m, (mean, var) in zip(bns, stats):
            m.track_running_stats, m.running_mean, m.running_var = True, mean, var
