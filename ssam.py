"""Sparse SAM (Mi et al., NeurIPS 2022) in one file; needs torch only. README.md: usage, guarantees, decisions.

SAM climbs to w + eps, eps = rho * g / ||g|| (Eq. 2), and descends with the gradient found there; SSAM perturbs
only the entries a bool mask m selects, eps ⊙ m, m from the empirical Fisher (SSAM-F, Eq. 5-6) or dropped and
grown during training (SSAM-D, Eq. 7-9). Sections: SAM | mask helpers | SSAM-F | SSAM-D | SAM-ON | 2:4 | BatchNorm.
"""
import copy
import itertools
import math
import re
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}   # first_step's bitwise eps = 0
_REFUSED = set()                   # (shapes, dtype, device) the 2:4 kernel refused: dense from then on
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())                      # what SAM-ON perturbs


# ---- SAM (Foret et al. 2021), the frame SSAM's masks plug into -------------------------------------
class SAM(torch.optim.Optimizer):
    """SAM; adaptive=True is ASAM (eps scaled by w^2). base_optimizer: a torch.optim.Optimizer class (built here
    with **kwargs) or one built over the same parameters; param_groups are shared with it."""
    _COUNTERS = ("steps",)             # saved in state_dict()["counters"]; subclasses add theirs

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho!r}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive))
        ours = {id(p) for g in self.param_groups for p in g["params"]}
        if isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            base_optimizer = base_optimizer(self.param_groups, **kwargs)
        elif not isinstance(base_optimizer, torch.optim.Optimizer) or kwargs or ours != {
                id(p) for g in base_optimizer.param_groups for p in g["params"]}:
            raise ValueError(f"base_optimizer must be an Optimizer class, or one over the same parameters (not other "
                             f"parameters) without extra arguments; got {base_optimizer!r}, {sorted(kwargs)}")
        self.base_optimizer = base_optimizer
        self.param_groups = self.base_optimizer.param_groups          # one set of groups: schedulers just work
        for group in self.param_groups:
            group.setdefault("rho", rho)
            group.setdefault("adaptive", adaptive)
        self.defaults.update(self.base_optimizer.defaults)
        self.steps = 0                 # completed steps (second_step calls)
        self.norm = "full"             # eps normalized by ||g|| over all parameters, as Eq. 2
        self._w = None                 # the weights w while the model sits at w + eps

    def _mask_for_step(self, params, grads):
        return None                    # dense SAM; the SSAM classes return (and update) their masks

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        """w <- w + eps, eps = rho * g / ||g||_2 (Eq. 2) ⊙ m (Alg. 1, line 9); p.grad becomes eps in place."""
        if self._w is not None:
            raise ValueError("first_step called twice: the weights are already perturbed; call second_step() first")
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        params = [p for _, ps in groups for p in ps]
        grads = [p.grad for p in params]
        if not params:
            raise ValueError("no gradients: run loss.backward() first, or use step(closure, both_passes=True)")
        masks = self._mask_for_step(params, grads)          # may raise (SSAMF without a mask): nothing changed yet
        if masks is not None and self.norm == "masked":
            torch._foreach_mul_(grads, masks)               # g ⊙ m, normalized by its own norm below
        ada = [p for g, ps in groups if g["adaptive"] for p in ps]
        if ada:                                             # ASAM: eps = rho * w^2 g / ||w g||
            torch._foreach_mul_([p.grad for p in ada], ada)
        norms = [n.to(params[0].device) for n in torch._foreach_norm(grads)]
        norm = torch.linalg.vector_norm(torch.stack(norms))  # ||g||
        for g, ps in groups:                                # Eq. 2: rho / ||g||; rho may differ between groups
            if ps:
                torch._foreach_mul_([p.grad for p in ps], (g["rho"] / (norm + 1e-12)).to(ps[0].device))
        if ada:
            torch._foreach_mul_([p.grad for p in ada], ada)
        if masks is not None and self.norm == "full":
            torch._foreach_mul_(grads, masks)               # eps ⊙ m (Alg. 1, line 9)
        # non-finite ||g||: eps = 0. A float times 0 stays NaN, so multiply the bits (an integer view) by 0 or 1
        torch._foreach_mul_([e.view(_INT[e.element_size()]) for e in grads], torch.isfinite(norm).long())
        self._w = (params, torch._foreach_clone(params))
        torch._foreach_add_(params, grads)                  # climb to w + eps
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self):                 # back to exactly w: a copy, not a subtraction; no-op when not perturbed
        if self._w is not None:
            torch._foreach_copy_(*self._w)
            self._w = None

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        if self._w is None:
            raise ValueError("second_step called without first_step: the weights are not perturbed")
        self.restore()
        self.base_optimizer.step()
        self.steps += 1
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None, both_passes=False):
        """davda54's: first_step, closure() (forward + backward; returns the loss) at w + eps, second_step.
        both_passes=True first runs the closure at w too and returns that loss."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that runs forward + backward and returns the loss")
        closure = torch.enable_grad()(closure)
        if both_passes:
            self.zero_grad()
            loss = closure()
        self.first_step(zero_grad=True)
        try:
            loss2 = closure()
        except BaseException:
            self.restore()
            self.zero_grad()
            raise
        self.second_step()
        return loss if both_passes else loss2

    def state_dict(self):
        if self._w is not None:
            raise ValueError("state_dict() while the weights are perturbed: call second_step() or restore() first")
        sd = super().state_dict()                           # our per-parameter state (masks) and the groups
        sd["base"] = self.base_optimizer.state_dict()       # momentum etc.
        counters = {k: getattr(self, k) for k in self._COUNTERS}       # SSAMD's generator: its state
        sd["counters"] = {k: v.get_state() if isinstance(v, torch.Generator) else v for k, v in counters.items()}
        return sd

    def load_state_dict(self, state_dict):              # ours, or davda54/sam's (with a warning)
        if "base" not in state_dict:
            if "param_groups" not in state_dict:
                raise ValueError(f"not an optimizer state_dict: keys {sorted(state_dict)}, expected 'param_groups'")
            warnings.warn("this state_dict has no 'base' entry (davda54/sam's?): the group settings load, but it "
                          "holds no base-optimizer state: momentum etc. start from zero", stacklevel=2)
            self.base_optimizer.load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        else:
            state_dict = dict(state_dict)
            base, counters = state_dict.pop("base"), state_dict.pop("counters")
            super().load_state_dict(state_dict)
            self.base_optimizer.load_state_dict(base)
            for k in self._COUNTERS:
                if isinstance(getattr(self, k), torch.Generator):
                    getattr(self, k).set_state(counters[k])
                else:
                    setattr(self, k, counters[k])
        self.param_groups = self.base_optimizer.param_groups  # loading replaced the list: share it again


# ---- Mask helpers: global top-k (Eq. 6, Alg. 2), N:M groups along the output axis, whole tensors ---
def nm_mask(score, n, m):
    """Top n of every m consecutive outputs per input: W [out, in, *k] as W^T [in*k, out] of dX = dY W (§4.1)."""
    wt = score.reshape(score.shape[0], -1).t()                        # [in*k, out]
    groups = wt.reshape(wt.shape[0], -1, m)                           # [in*k, out/m, m]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(wt.shape).t().reshape(score.shape)


def topk_masks(scores, k, largest=True):
    """Bool masks of the k largest (or smallest) entries across all tensors in `scores` (ArgTopK, Eq. 6)."""
    flat = torch.cat([s.reshape(-1).to(scores[0].device) for s in scores])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(k, largest=largest, sorted=False).indices] = True
    return [piece.reshape(s.shape).to(s.device) for piece, s in zip(keep.split([s.numel() for s in scores]), scores)]


def ascent_costs(model, *inputs):
    """{parameter: (forward, later layers' input grads, its weight grad)} in multiply-adds, from one forward."""
    order, macs, hooks = {}, {}, []

    def per_out(m):                # multiply-adds per output: a Linear row, a conv window, else elementwise
        if isinstance(m, nn.Linear):
            return m.in_features
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.in_channels // m.groups * math.prod(m.kernel_size)
        return 1
    for m in (m for m in model.modules() if next(m.parameters(recurse=False), None) is not None):   # order: 1st call
        hooks += [m.register_forward_pre_hook(lambda m, a: order.update({m: order.get(m, len(order))})),
                  m.register_forward_hook(lambda m, a, o: macs.update({m: macs.get(m, 0) + o.numel() * per_out(m)}))]
    try:
        with torch.no_grad(), frozen_bn_stats(model):
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return {p: (sum(macs.values()), sum(f for k, f in macs.items() if order[k] > order[m]),
                macs[m] * p.numel() / sum(q.numel() for q in m.parameters(recurse=False)))   # dW: its share
            for m in order for p in m.parameters(recurse=False)}


def tensor_masks(scores, density):
    """Whole tensors, best mean score first, each taken if it still fits in density·|w| (all costs equal)."""
    return cost_tensor_masks(scores, density, [(1, 0, 0)] * len(scores))


def cost_tensor_masks(scores, density, costs):
    """Whole tensors. For each lowest layer allowed, fill density·|w| from the tensors above it, best mean score
    first, each if it still fits; the fill with the most score per multiply-add of the ascent pass (costs) wins."""
    sizes, (fwd, dx, dw) = [s.numel() for s in scores], zip(*costs)
    mass = torch.stack([s.float().sum().to(scores[0].device) for s in scores]).tolist()   # one sync per update
    best = (-1.0, [])
    for cut in sorted(set(dx)):
        room, take = round(density * sum(sizes)), []
        for i in sorted(range(len(scores)), key=lambda i: -mass[i] / sizes[i]):
            if dx[i] <= cut and sizes[i] <= room:
                take, room = take + [i], room - sizes[i]
        cost = max(fwd) + max((dx[i] for i in take), default=0) + sum(dw[i] for i in take)
        best = max(best, (sum(mass[i] for i in take) / cost, take))
    return [torch.full_like(s, i in best[1], dtype=torch.bool) for i, s in enumerate(scores)]


def select_masks(scores, density, nm=None, costs=None):
    """Masks at exact density (Eq. 6): N:M where a tensor holds the pattern, else one global top-k; or tensors."""
    if nm == "tensor":
        return cost_tensor_masks(scores, density, costs or [(1, 0, 0)] * len(scores))
    fits = [isinstance(nm, tuple) and s.dim() >= 2 and s.shape[0] % nm[1] == 0 for s in scores]   # holds N:M
    masks = [nm_mask(s, *nm) if ok else None for s, ok in zip(scores, fits)]
    pooled = [i for i, mk in enumerate(masks) if mk is None]
    if pooled:
        k = round(density * sum(scores[i].numel() for i in pooled))
        for i, mk in zip(pooled, topk_masks([scores[i] for i in pooled], k)):
            masks[i] = mk
    return masks


class _SparseSAM(SAM):
    """Shared by SSAM-F, SSAM-D, SAM-ON: bool masks opt.state[p]["mask"] for opt.masked, the schedule, the checks."""
    _COUNTERS = ("steps", "last_mask_update")

    def __init__(self, params, base_optimizer, rho, sparsity, update_interval, structure, norm, costs=None, **kwargs):
        if not 0 <= sparsity <= 1:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
        if not (isinstance(update_interval, int) and update_interval >= 1):
            raise ValueError(f"update_interval must be an integer >= 1 (steps), got {update_interval!r}")
        self.nm = structure if structure in (None, "tensor") else None   # 'N:M' -> (N, M)
        if structure not in (None, "unstructured", "tensor"):
            n, m = map(int, structure.split(":")) if re.fullmatch(r"\d+:\d+", str(structure)) else (0, 0)
            if not 0 < n <= m:
                raise ValueError(f"unknown structure {structure!r}: use None, 'tensor' or 'N:M' with 0 < N <= M")
            if not math.isclose(sparsity, 1 - n / m):           # N:M fixes the density at N/M
                raise ValueError(f"structure {structure!r} needs sparsity={1 - n / m:g}, got {sparsity!r}")
            self.nm = (n, m)
        norm = norm or ("masked" if self.nm == "tensor" else "full")
        if norm not in ("full", "masked") or (self.nm == "tensor" and norm != "masked"):
            raise ValueError(f"norm={norm!r} not allowed: use 'full' (||g||, the paper) or 'masked' (||g ⊙ m||); "
                             "structure='tensor' needs 'masked', since unperturbed tensors get no ascent gradient")
        if costs is not None and self.nm != "tensor":
            raise ValueError("costs= picks whole tensors by their ascent cost: it needs structure='tensor'")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.sparsity, self.update_interval, self.structure, self.norm = sparsity, update_interval, structure, norm
        self.masked = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not self.masked:
            raise ValueError("every parameter has requires_grad=False: there is nothing to train or perturb")
        self.costs = costs and [costs.get(p, (0, 0, 0)) for p in self.masked]   # None: the paper's ranking
        self.last_mask_update = -1     # step of the last mask update; -1: never
        self._unperturbed = []         # structure='tensor': the tensors ascent_pass() freezes

    @property
    def mask_update_due(self):         # before the first mask, then every update_interval steps
        return self.last_mask_update < 0 or self.steps - self.last_mask_update >= self.update_interval

    def masks(self):
        return [self.state[p]["mask"] for p in self.masked]

    def density(self):                 # fraction of the trainable entries perturbed (1 - s); syncs: for logging
        masks = self.masks()
        return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    def _set_masks(self, masks, count_update=True):
        for p, mk in zip(self.masked, masks):
            self.state[p]["mask"] = mk
        if count_update:
            self.last_mask_update = self.steps
        if self.nm == "tensor":
            self._unperturbed = [p for p, mk in zip(self.masked, masks) if not mk.any()]   # sync: per update

    def _mask_for_step(self, params, grads):
        if self.last_mask_update < 0:
            raise ValueError("no mask yet: call opt.update_mask(model, data) first (when opt.mask_update_due)")
        if any("mask" not in self.state.get(p, ()) for p in params):
            raise ValueError("a parameter frozen when the optimizer was built has a gradient: rebuild after unfreezing")
        return [self.state[p]["mask"] for p in params]

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)                 # which casts masks to the parameter dtype: back to bool
        if self.last_mask_update >= 0:
            self._set_masks([m.bool() for m in self.masks()], count_update=False)

    @contextmanager
    def ascent_pass(self):             # around the FIRST pass: structure='tensor' freezes unperturbed tensors
        frozen = [p for p in self._unperturbed if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)


# ---- SSAM-F: the mask from the empirical Fisher (Eq. 3-6, Alg. 2 Option I) -------------------------
def empirical_fisher(model, data, num_samples, loss_fn=None, chunk_size=None):
    """Eq. 5: {parameter: sum over num_samples samples of the squared per-sample gradient} for every trainable
    parameter (the 1/N_F does not change the ranking): torch.func's gradient of one sample's loss, vmapped over
    chunk_size samples (default 32 on a GPU, 1 on a CPU), on a copy sharing the weights read-only."""
    loss_fn = loss_fn or F.cross_entropy
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    weights = {n: p.detach() for n, p in named.items()}
    net = copy.deepcopy(model, memo={id(p): p.detach() for p in model.parameters()})   # buffers copied
    for m in net.modules():                 # train-mode BatchNorm: each sample alone, as the authors' batch-1 loop
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
            m.forward = (lambda a, m=m: _bn_one_sample(m, a))

    def sample_loss(w, xi, yi):
        return loss_fn(torch.func.functional_call(net, w, (xi[None],)), yi[None])

    device = next(iter(weights.values())).device
    chunk_size = chunk_size or (32 if device.type == "cuda" else 1)
    per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
    fisher, seen = [torch.zeros_like(w) for w in weights.values()], 0
    for x, y in data:
        x, y = x[: num_samples - seen].to(device), y[: num_samples - seen].to(device)
        for xc, yc in zip(x.split(chunk_size), y.split(chunk_size)):
            g = per_sample(weights, xc, yc)
            torch._foreach_add_(fisher, [g[n].square().sum(0) for n in weights])     # Eq. 5: sum_i g_i^2
        seen += len(x)
        if seen >= num_samples:
            break
    if seen < num_samples:
        raise ValueError(f"data gave {seen} samples but num_samples={num_samples}: pass more data or lower num_samples")
    return dict(zip(named.values(), fisher))


def _bn_one_sample(m, a):
    """Train-mode BatchNorm of one sample: its own statistics, or the running ones at one value per channel."""
    if a[0, 0].numel() > 1:
        return F.instance_norm(a, weight=m.weight, bias=m.bias, eps=m.eps)
    if m.running_mean is None:
        raise ValueError(f"{m} sees [B, C] inputs and has no running statistics to normalize one sample (Fisher): "
                         "build it with track_running_stats=True")
    return F.batch_norm(a, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


class SSAMF(_SparseSAM):
    """SSAM-F: perturb the (1-s)·|w| entries with the largest empirical Fisher (Eq. 6). Before each step:
    `if opt.mask_update_due: opt.update_mask(model, batches)`."""

    def __init__(self, params, base_optimizer, rho=0.05, sparsity=0.5, num_samples=128, update_interval=1000,
                 structure=None, norm=None, **kwargs):
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        super().__init__(params, base_optimizer, rho, sparsity, update_interval, structure, norm, **kwargs)
        self.num_samples = num_samples

    @torch.no_grad()
    def update_mask(self, model, data, loss_fn=None, chunk_size=None):
        """The Fisher of the first num_samples samples of `data`, (inputs, targets) batches (Eq. 5); top-k (Eq. 6)."""
        with torch.enable_grad():
            fisher = empirical_fisher(model, data, self.num_samples, loss_fn, chunk_size)
        if any(p not in fisher for p in self.masked):
            raise ValueError("some parameters are not trainable ones of `model`: pass their model (DDP: model.module)")
        self._set_masks(select_masks([fisher[p] for p in self.masked], 1 - self.sparsity, self.nm, self.costs))


# ---- SSAM-D: the mask from dynamic sparse training (Eq. 7-9, Alg. 2 Option II) ---------------------
class SSAMD(_SparseSAM):
    """SSAM-D: a random mask at density 1-s, dropped and grown every update_interval steps inside first_step with
    that step's gradient. Draws use the optimizer's own generator (seed; saved in state_dict)."""
    _COUNTERS = _SparseSAM._COUNTERS + ("generator",)

    def __init__(self, params, base_optimizer, rho=0.05, sparsity=0.5, drop_rate=0.5, update_interval=1000,
                 total_steps=None, structure=None, norm=None, seed=None, **kwargs):
        if not 0 <= drop_rate <= 1:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate!r}")
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"total_steps must be the run's number of steps (an integer >= 1), got {total_steps!r}")
        super().__init__(params, base_optimizer, rho, sparsity, update_interval, structure, norm, **kwargs)
        self.drop_rate, self.total_steps = drop_rate, total_steps
        self.generator = torch.Generator(device=self.masked[0].device)
        self.generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
        rand = [self._rand(p) for p in self.masked]
        self._set_masks(select_masks(rand, 1 - sparsity, self.nm, self.costs))      # Alg. 1 line 1: random mask

    def _rand(self, p):
        shape = () if self.nm == "tensor" else p.shape      # structure='tensor': one draw per tensor
        return torch.rand(shape, generator=self.generator, device=self.generator.device).to(p.device).expand(p.shape)

    def drop_count(self, t):
        """N_drop = f_decay(t; alpha)·(1-s)·|w| (Alg. 2 line 8, Eq. 9), |w| counting trainable entries."""
        f_decay = self.drop_rate / 2 * (1 + math.cos(t * math.pi / self.total_steps))
        return int(f_decay * (1 - self.sparsity) * sum(p.numel() for p in self.masked))

    @torch.no_grad()
    def update_mask(self, grads):
        """One drop-and-grow round with `grads`, one per parameter of opt.masked (None: zero)."""
        masks = self.masks()
        g = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(self.masked, grads)]
        n_drop = self.drop_count(self.steps)
        # Eq. 7: among the perturbed entries, drop the n_drop with the smallest |g|
        drop_scores = [torch.where(m, gr.abs(), math.inf) for m, gr in zip(masks, g)]
        if self.nm == "tensor":                             # whole tensors, smallest mean |g| first, >= n_drop
            means = torch.stack([s.mean().to(drop_scores[0].device) for s in drop_scores]).tolist()
            order = [i for i in sorted(range(len(masks)), key=means.__getitem__) if means[i] < math.inf]
            before = itertools.accumulate((masks[i].numel() for i in order), initial=0)   # entries dropped before i
            drop = {i for i, b in zip(order, before) if b < n_drop}
            dropped = [torch.full_like(m, i in drop) for i, m in enumerate(masks)]
        else:
            dropped = topk_masks(drop_scores, n_drop, largest=False)
        kept = [m & ~d for m, d in zip(masks, dropped)]
        # Eq. 8: grow at random among the unperturbed: kept entries score 2, the rest uniform in [0, 1)
        grow_scores = [torch.where(k, 2.0, self._rand(p)) for k, p in zip(kept, self.masked)]
        self._set_masks(select_masks(grow_scores, 1 - self.sparsity, self.nm, self.costs))

    def _mask_for_step(self, params, grads):
        if self.mask_update_due:                            # grads are the params' p.grad
            self.update_mask([p.grad for p in self.masked])
        return super()._mask_for_step(params, grads)


# ---- SAM-ON (Mueller et al., 2023): only the normalization layers ---------------------------------
class SAMON(_SparseSAM):
    """Perturb only the trainable parameters of NORM_LAYERS, eps = rho·(g ⊙ m)/||g ⊙ m||, as structure='tensor'."""

    def __init__(self, model, base_optimizer, rho=0.05, **kwargs):
        norms = [m for m in model.modules() if isinstance(m, NORM_LAYERS)]
        on = {id(p) for m in norms for p in m.parameters(recurse=False) if p.requires_grad}
        if not on:
            raise ValueError("the model has no normalization layer with trainable parameters: nothing to perturb")
        trainable = [p for p in model.parameters() if p.requires_grad]
        density = sum(p.numel() for p in trainable if id(p) in on) / sum(p.numel() for p in trainable)
        params = list(model.parameters())
        super().__init__(params, base_optimizer, rho, 1 - density, 2**62, "tensor", "masked", **kwargs)
        self._set_masks([torch.full_like(p, id(p) in on, dtype=torch.bool) for p in self.masked])   # never updated


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
        gx = None                                           # autograd casts each back to its input's dtype
        if ctx.needs_input_grad[0]:
            gx = sparse_input_grad(gy2, weight, mask).reshape(*gy.shape[:-1], weight.shape[1])
        return gx, gy2.t() @ x.reshape(-1, x.shape[-1]), gy2.sum(0) if ctx.needs_input_grad[2] else None, None


def sparse_input_grad(gy, weight, mask):
    """dX = dY (W ⊙ M), dY [B, out]: on CUDA in fp16/bf16 via 2:4 sparse tensor cores, elsewhere dense."""
    wm = weight * mask
    key = (wm.shape, gy.shape, wm.dtype, wm.device)
    if wm.is_cuda and wm.dtype in (torch.float16, torch.bfloat16) and key not in _REFUSED:
        try:
            wt = torch.sparse.to_sparse_semi_structured(wm.t().contiguous())     # [in, out]; W changes: each call
            return (wt @ gy.t().contiguous()).t()
        except (RuntimeError, ValueError, NotImplementedError):
            _REFUSED.add(key)                               # kernel refused this shape/GPU: dense from now on
    return gy @ wm


@contextmanager
def sparse_ascent(model, opt):
    """Around the FIRST pass: nn.Linear layers with an N:M mask in `opt` take dX = dY·(W ⊙ M), so layers below see
    dY through W ⊙ M (the TPAMI follow-up's "implicit" SSAM). Yields the patched layers (not torch.compile'd)."""
    if not isinstance(getattr(opt, "nm", None), tuple):
        raise ValueError("sparse_ascent needs an SSAMF/SSAMD optimizer built with structure='N:M' (e.g. '2:4')")
    patched = []
    for mod in model.modules():
        mask = opt.state.get(mod.weight, {}).get("mask") if isinstance(mod, nn.Linear) else None
        if mask is not None and mod.weight.shape[0] % opt.nm[1] == 0:   # an N:M mask, not the pooled top-k
            mod.forward = (lambda x, mod=mod, mask=mask: _MaskedInputGrad.apply(x, mod.weight, mod.bias, mask))
            patched.append(mod)
    try:
        yield patched
    finally:
        for mod in patched:
            del mod.forward                             # back to nn.Linear.forward


# ---- BatchNorm: running statistics follow the first pass only --------------------------------------
@contextmanager
def frozen_bn_stats(model):
    """Around the SECOND pass: train-mode BatchNorm uses the batch's statistics but updates no running statistic."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    bns = [m for m in bns if m.training and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False                   # BatchNorm then neither updates nor counts
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True
