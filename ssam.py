"""Sparse Sharpness-Aware Minimization (SSAM) in one file. Needs torch only: copy it into your repo.

Mi et al., "Make Sharpness-Aware Minimization Stronger: A Sparsified Perturbation Approach", NeurIPS 2022.
SAM climbs to w + eps, eps = rho * g / ||g|| (Eq. 2), and descends with the gradient found there. SSAM
perturbs only the entries a binary mask m selects, eps = rho * g / ||g|| ⊙ m, with m from the empirical
Fisher (SSAM-F, Eq. 5-6) or grown and dropped during training (SSAM-D, Eq. 7-9).

    opt = SSAMD(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, total_steps=T, lr=0.05, momentum=0.9)
    for x, y in loader:
        loss_fn(model(x), y).backward()          # 1st pass: gradient at w
        opt.first_step(zero_grad=True)           # w <- w + eps
        with frozen_bn_stats(model):
            loss_fn(model(x), y).backward()      # 2nd pass: gradient at w + eps
        opt.second_step(zero_grad=True)          # w back exactly, then the base optimizer steps

Contents, in the paper's order: SAM (Eq. 2) | mask helpers (top-k, N:M, whole tensors) | SSAMF (Eq. 3-6) |
SSAMD (Eq. 7-9) | SAMON (normalization layers only) | the 2:4 sparse backward | the BatchNorm helper.
"""
import copy
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# SAM (Foret et al. 2021), the frame SSAM's masks plug into

class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization; `adaptive=True` is ASAM (eps scaled element-wise by w^2).

    base_optimizer: an optimizer class (built here over SAM's param groups with **kwargs) or an optimizer
    instance already built over the same parameters. `param_groups` are the base optimizer's, so LR
    schedulers work on either object (build them on `opt.base_optimizer` to avoid PyTorch's warning that
    `opt.step()` was never called).

    Memory beyond the base optimizer: one copy of the perturbed weights (for the exact restore) plus, in the
    SSAM classes, one bool mask per parameter. first_step turns p.grad into eps in place (no extra buffer).

    A non-finite gradient norm in the first pass (inf/NaN anywhere) gives eps = 0: the weights are not
    perturbed, the second pass sees w itself and the step is the base optimizer's (whose own NaN handling,
    e.g. GradScaler's skipped step, then applies). Weights are restored bit for bit in second_step or
    restore(); step(closure) restores them if the closure raises.
    """

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho!r}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive))
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if kwargs:
                raise ValueError(f"base_optimizer is already built; drop the extra arguments {sorted(kwargs)}")
            ours = {id(p) for g in self.param_groups for p in g["params"]}
            theirs = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if ours != theirs:
                raise ValueError("base_optimizer was built over other parameters than the ones given to SAM")
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        else:
            raise ValueError(f"base_optimizer must be a torch.optim.Optimizer class or instance, got {base_optimizer!r}")
        self.param_groups = self.base_optimizer.param_groups          # one set of groups: schedulers just work
        for group in self.param_groups:
            group.setdefault("rho", rho)
            group.setdefault("adaptive", adaptive)
        self.defaults.update(self.base_optimizer.defaults)
        self.steps = 0                 # completed steps (second_step calls)
        self.norm = "full"             # eps normalized by ||g|| over all parameters, as Eq. 2
        self._w = None                 # the weights w while the model sits at w + eps

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _mask_for_step(self, params, grads):
        """Masks for this step's perturbation, or None for dense SAM. SSAM classes update masks here."""
        return None

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        """w <- w + eps with eps = rho * g / ||g||_2 (Eq. 2), times the mask m in SSAM (Alg. 1, line 9)."""
        if self._w is not None:
            raise ValueError("first_step called twice: the weights are already perturbed; call second_step() first")
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        params = [p for _, ps in groups for p in ps]
        grads = [p.grad for p in params]
        if not params:
            raise ValueError("first_step found no gradients: run loss.backward() before first_step()")
        masks = self._mask_for_step(params, grads)          # may raise (SSAMF without a mask): nothing changed yet
        if masks is not None and self.norm == "masked":
            torch._foreach_mul_(grads, masks)               # g ⊙ m, normalized by its own norm below
        ada = [p for g, ps in groups if g["adaptive"] for p in ps]
        if ada:                                             # ASAM: eps = rho * w^2 g / ||w g||
            torch._foreach_mul_([p.grad for p in ada], ada)
        device = params[0].device
        norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in torch._foreach_norm(grads)]))
        finite = torch.isfinite(norm)                       # ||g||_2 over all parameters (Eq. 2) or ||g ⊙ m||_2
        for g, ps in groups:                                # rho may differ between groups
            if ps:
                scale = torch.where(finite, g["rho"] / (norm + 1e-12), 0.0)
                torch._foreach_mul_([p.grad for p in ps], scale.to(ps[0].device))
        if ada:
            torch._foreach_mul_([p.grad for p in ada], ada)
        if masks is not None and self.norm == "full":
            torch._foreach_mul_(grads, masks)               # eps ⊙ m (Alg. 1, line 9)
        for e in grads:                                     # non-finite g: eps = 0 instead of NaN weights
            e.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        self._w = (params, torch._foreach_clone(params))
        torch._foreach_add_(params, grads)                  # climb to w + eps
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self):
        """Put the weights back to exactly w (no-op when they are not perturbed)."""
        if self._w is not None:
            params, w = self._w
            torch._foreach_copy_(params, w)
            self._w = None

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        """Back to exactly w, then the base optimizer steps with the gradient taken at w + eps."""
        if self._w is None:
            raise ValueError("second_step called without first_step: the weights are not perturbed")
        self.restore()
        self.base_optimizer.step()
        self.steps += 1
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        """Both passes: `closure` runs forward + backward and returns the loss; called twice."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that zeroes nothing, runs forward+backward and returns the loss")
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        try:
            closure()
        except BaseException:
            self.restore()
            self.zero_grad()
            raise
        self.second_step()
        return loss

    def state_dict(self):
        if self._w is not None:
            raise ValueError("state_dict() while the weights are perturbed: call second_step() or restore() first")
        sd = super().state_dict()                           # our per-parameter state (masks) and the groups
        sd["base"] = self.base_optimizer.state_dict()       # momentum etc.
        sd["counters"] = {k: getattr(self, k) for k in ("steps", "last_mask_update") if hasattr(self, k)}
        if hasattr(self, "generator"):                      # SSAMD's growth RNG
            sd["counters"]["generator"] = self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        base, counters = state_dict.pop("base"), state_dict.pop("counters")
        super().load_state_dict(state_dict)
        self.base_optimizer.load_state_dict(base)
        self.param_groups = self.base_optimizer.param_groups  # loading replaced the list: share it again
        for k, v in counters.items():
            self.generator.set_state(v) if k == "generator" else setattr(self, k, v)


# ----------------------------------------------------------------------------------------------------
# Mask helpers: global top-k (Eq. 6, Alg. 2) and N:M groups along the output axis

def _parse_structure(structure, sparsity):
    """None/'unstructured' -> None; 'tensor' -> 'tensor'; 'N:M' -> (N, M) after checking that sparsity agrees."""
    if structure in (None, "unstructured", "tensor"):
        return None if structure == "unstructured" else structure
    try:
        n, m = (int(v) for v in str(structure).split(":"))
    except ValueError:
        raise ValueError(f"unknown structure {structure!r}: use None, 'unstructured', 'tensor' or 'N:M' such as '2:4'") from None
    if not 0 < n <= m:
        raise ValueError(f"structure {structure!r} needs 0 < N <= M")
    if not math.isclose(sparsity, 1 - n / m):
        raise ValueError(f"structure {structure!r} fixes the density at {n}/{m}: pass sparsity={1 - n / m:g}, got {sparsity!r}")
    return n, m


def _nm_eligible(p, nm):
    return isinstance(nm, tuple) and p.dim() >= 2 and p.shape[0] % nm[1] == 0


def nm_mask(score, n, m):
    """Keep the n highest-score entries of every m consecutive outputs, for each input position.

    The weight [out, in, *k] is seen as W^T [in*k, out] (the operand of dX = dY W), grouped along out.
    """
    wt = score.reshape(score.shape[0], -1).t()                        # [in*k, out]
    groups = wt.reshape(wt.shape[0], -1, m)                           # [in*k, out/m, m]
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(wt.shape).t().reshape(score.shape)


def topk_masks(scores, k, largest=True):
    """Bool masks of the k largest (or smallest) entries across all tensors in `scores` (ArgTopK, Eq. 6)."""
    device = scores[0].device
    flat = torch.cat([s.reshape(-1).to(device) for s in scores])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(k, largest=largest, sorted=False).indices] = True
    return [piece.reshape(s.shape).to(s.device) for piece, s in zip(keep.split([s.numel() for s in scores]), scores)]


def tensor_masks(scores, density):
    """structure='tensor': whole tensors, best mean score first, each taken if it still fits in density·|w|.
    The perturbed count never exceeds the target and falls short of it by less than any skipped tensor."""
    sizes = [s.numel() for s in scores]
    budget = round(density * sum(sizes))
    means = torch.stack([s.float().mean().to(scores[0].device) for s in scores]).tolist()   # one sync per update
    keep = [False] * len(scores)
    for i in sorted(range(len(scores)), key=lambda i: -means[i]):
        if sizes[i] <= budget:
            keep[i], budget = True, budget - sizes[i]
    return [torch.full_like(s, k, dtype=torch.bool) for s, k in zip(scores, keep)]


def ascent_costs(model, *inputs):
    """{parameter: (forward, input grads of all later layers, its weight grad)} in multiply-adds, for
    cost_tensor_masks, from one hooked forward of `inputs` (only shapes matter)."""
    order, macs = {}, {}

    def enter(m, args):                            # a layer's place: the start of its first call
        order.setdefault(m, len(order))

    def count(m, args, out):                       # per output: a Linear row, a conv window, or elementwise
        macs[m] = macs.get(m, 0) + out.numel() * (m.in_features if isinstance(m, nn.Linear) else m.in_channels //
                  m.groups * math.prod(m.kernel_size) if isinstance(m, nn.modules.conv._ConvNd) else 1)
    hooks = [h for m in model.modules() if next(m.parameters(recurse=False), None) is not None
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(count))]
    try:
        with torch.no_grad(), frozen_bn_stats(model):
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return {p: (sum(macs.values()), sum(f for k, f in macs.items() if order[k] > order[m]),
                macs[m] * p.numel() / sum(q.numel() for q in m.parameters(recurse=False)))   # dW: its share
            for m in order for p in m.parameters(recurse=False)}


def cost_tensor_masks(scores, density, costs):
    """structure='tensor' by cost: the ascent pass pays the forward, input grads down to the lowest perturbed
    layer and the perturbed tensors' weight grads (costs[i] from ascent_costs). For each cut (lowest layer
    allowed), tensor_masks' rule fills the budget from the tensors above it; the fill with the most score
    mass (Fisher or |g|) per unit of cost wins. Never exceeds density·|w|; may fall short of it."""
    sizes, (fwd, dx, dw) = [s.numel() for s in scores], zip(*costs)
    mass = torch.stack([s.float().sum().to(scores[0].device) for s in scores]).tolist()
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
    """Masks at exact density: N:M per group where a tensor holds the pattern, else one global top-k;
    nm='tensor' selects whole tensors (tensor_masks, or cost_tensor_masks when costs are given)."""
    if nm == "tensor":
        return cost_tensor_masks(scores, density, costs) if costs else tensor_masks(scores, density)
    masks = [nm_mask(s, *nm) if _nm_eligible(s, nm) else None for s in scores]
    pooled = [i for i, mk in enumerate(masks) if mk is None]
    if pooled:
        k = round(density * sum(scores[i].numel() for i in pooled))
        for i, mk in zip(pooled, topk_masks([scores[i] for i in pooled], k)):
            masks[i] = mk
    return masks


class _SparseSAM(SAM):
    """What SSAM-F and SSAM-D share: the masks, the schedule, validation, counters.

    structure: None (element-wise, the paper), 'N:M' such as '2:4' (N of every M outputs, see nm_mask;
    sparsity must be 1 - N/M), or 'tensor' (whole parameter tensors: wrap the first pass in
    `with opt.ascent_pass():` and unperturbed tensors cost no weight gradient there).
    costs: ascent_costs(model, x) to pick whole tensors by score per ascent cost (cost_tensor_masks).
    norm: 'full' (default for element-wise and N:M masks) normalizes eps by ||g|| over all parameters as
    the paper writes it; 'masked' by ||g ⊙ m||, which structure='tensor' requires since it never computes
    the full gradient in the first pass.
    """

    def __init__(self, params, base_optimizer, rho, sparsity, update_interval, structure, norm, costs=None, **kwargs):
        if not 0 <= sparsity <= 1:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
        if not (isinstance(update_interval, int) and update_interval >= 1):
            raise ValueError(f"update_interval must be an integer >= 1 (steps), got {update_interval!r}")
        self.nm = _parse_structure(structure, sparsity)
        if norm is None:
            norm = "masked" if self.nm == "tensor" else "full"
        if norm not in ("full", "masked") or (self.nm == "tensor" and norm != "masked"):
            raise ValueError(f"norm={norm!r} not allowed: use 'full' (||g||, the paper) or 'masked' (||g ⊙ m||); "
                             "structure='tensor' needs 'masked', since unperturbed tensors get no ascent gradient")
        if costs is not None and self.nm != "tensor":
            raise ValueError("costs= picks whole tensors by their ascent cost: it needs structure='tensor'")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.sparsity, self.update_interval, self.structure, self.norm = sparsity, update_interval, structure, norm
        self.costs = costs and [costs.get(p, (0, 0, 0)) for p in self._params()]   # None: the paper's ranking
        self.last_mask_update = -1     # step of the last mask update; -1: never
        self._unperturbed = []         # structure='tensor': the tensors ascent_pass() freezes

    @property
    def mask_update_due(self):
        """True before the first mask and once `update_interval` steps have passed since the last update."""
        return self.last_mask_update < 0 or self.steps - self.last_mask_update >= self.update_interval

    def masks(self):
        return [self.state[p]["mask"] for p in self._params()]

    def _mask_for_step(self, params, grads):
        return [self.state[p]["mask"] for p in params]

    def load_state_dict(self, state_dict):
        """Optimizer.load_state_dict casts the masks to the parameter dtype: back to bool, and the
        structure='tensor' cache rebuilt."""
        super().load_state_dict(state_dict)
        if self.last_mask_update >= 0:
            self._set_masks([m.bool() for m in self.masks()], count_update=False)

    def density(self):
        """Fraction of entries perturbed (1 - s). Synchronizes with the device: for logging."""
        masks = self.masks()
        return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    def _set_masks(self, masks, count_update=True):
        for p, mk in zip(self._params(), masks):
            self.state[p]["mask"] = mk
        if count_update:
            self.last_mask_update = self.steps
        if self.nm == "tensor":
            self._unperturbed = [p for p, mk in zip(self._params(), masks) if not mk.any()]   # sync: per update

    @contextmanager
    def ascent_pass(self):
        """Around the FIRST forward/backward. With structure='tensor' the unperturbed tensors get no weight
        gradient there (requires_grad off for this pass only, back on whatever happens), and backward stops
        below the lowest perturbed layer. Other structures: nothing to skip, a no-op."""
        frozen = [p for p in self._unperturbed if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)


# ----------------------------------------------------------------------------------------------------
# SSAM-F: the mask from the empirical Fisher (Eq. 3-6, Alg. 2 Option I)

def empirical_fisher(model, data, num_samples, loss_fn=None, chunk_size=32):
    """Sum over `num_samples` samples of the squared per-sample gradient (Eq. 5; the 1/N_F does not change
    the ranking). Returns {parameter of `model`: tensor}.

    Works on a copy of the model that shares its weights read-only, so the model's parameters, gradients
    and BatchNorm buffers are never touched. Each BatchNorm layer behaves as in the authors' batch-1 loop:
    in train mode (or without running statistics) each sample is normalized as its own batch of one; in
    eval mode with the running statistics. Per-sample gradients come `chunk_size` samples at a time from
    one batched forward/backward: for models built of Linear, Conv2d and normalization layers, each called
    once per forward, a layer's per-sample gradient is rebuilt from its input and output gradient
    (_tapped_sq_grads); any other model goes through torch.func (vmap of grad).
    """
    loss_fn = loss_fn or F.cross_entropy
    named = dict(model.named_parameters())
    net = copy.deepcopy(model, memo={id(p): p.detach() for p in named.values()})   # buffers copied, weights shared
    for mod in net.modules():
        if hasattr(mod, "inplace"):
            mod.inplace = False                          # taps need each layer's own output
        mod.per_sample_stats = isinstance(mod, nn.modules.batchnorm._BatchNorm) and (
            mod.training or mod.running_mean is None)    # batch statistics of a batch of one: instance norm
        if mod.per_sample_stats:
            mod.forward = (lambda a, m=mod: F.instance_norm(a, weight=m.weight, bias=m.bias, eps=m.eps))
    tapped = all(_tappable(mod) for mod in net.modules())
    fisher = {n: torch.zeros_like(p) for n, p in named.items()}
    device, seen = next(iter(named.values())).device, 0
    for x, y in data:
        x, y = x[: num_samples - seen].to(device), y[: num_samples - seen].to(device)
        for xc, yc in zip(x.split(chunk_size), y.split(chunk_size)):
            sq = _tapped_sq_grads(net, xc, yc, loss_fn) if tapped else None
            if sq is None:                               # not tappable, or a layer ran twice: torch.func
                tapped, sq = False, _func_sq_grads(net, xc, yc, loss_fn)
            torch._foreach_add_(list(fisher.values()), [sq[n] for n in fisher])      # Eq. 5
        seen += len(x)
        if seen >= num_samples:
            break
    if seen < num_samples:
        raise ValueError(f"data gave {seen} samples but num_samples={num_samples}: pass more data or lower num_samples")
    return {named[n]: f for n, f in fisher.items()}


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _tappable(mod):
    if next(mod.parameters(recurse=False), None) is None:
        return True
    if isinstance(mod, nn.Conv2d):
        return mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
    return isinstance(mod, (nn.Linear,) + _NORMS) and (not isinstance(mod, nn.LayerNorm) or mod.weight is not None)


class _Tap(torch.autograd.Function):
    """Identity on a layer's output that appends the output's gradient to `box` (later in-place ops are fine)."""

    @staticmethod
    def forward(ctx, x, box):
        ctx.box = box
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.box.append(g)
        return g, None


def _tapped_sq_grads(net, x, y, loss_fn):
    """{name: sum_i g_i^2} from one batched pass: per-sample grads of Linear (δ aᵀ), Conv2d (δ unfold(a)ᵀ) and
    norm layers (Σ δ ⊙ x̂, Σ δ), from each layer's input a and output gradient δ. None if a layer ran twice."""
    taps = []

    def tap(mod, inputs, out):
        taps.append([mod, inputs[0].detach()])
        return _Tap.apply(out, taps[-1])

    hooks = [m.register_forward_hook(tap) for m in net.modules() if next(m.parameters(recurse=False), None) is not None]
    try:
        x = x.detach().requires_grad_(True)
        out = net(x)
        torch.autograd.grad(sum(loss_fn(out[i:i + 1], y[i:i + 1]) for i in range(len(x))), x)
    finally:
        for h in hooks:
            h.remove()
    if len({id(mod) for mod, *_ in taps}) < len(taps):
        return None
    sq, name = {}, {id(p): n for n, p in net.named_parameters()}
    for mod, a, g in taps:
        b = len(a)
        if isinstance(mod, nn.Linear) and a.dim() == 2:
            sq[name[id(mod.weight)]] = (g * g).t() @ (a * a)                 # sum_i (δ_i a_iᵀ)^2, never materialized
            gb = g
        elif isinstance(mod, nn.Linear):
            sq[name[id(mod.weight)]] = torch.einsum("b...o,b...i->boi", g, a).square_().sum(0)
            gb = g.reshape(b, -1, g.shape[-1]).sum(1)
        elif isinstance(mod, nn.Conv2d):
            cols = F.unfold(a, mod.kernel_size, mod.dilation, mod.padding, mod.stride)       # [b, in*k*k, L]
            sq[name[id(mod.weight)]] = torch.bmm(g.flatten(2), cols.transpose(1, 2)).square_().sum(0).view_as(mod.weight)
            gb = g.flatten(2).sum(2)
        else:                                                               # BatchNorm, GroupNorm, LayerNorm
            if isinstance(mod, nn.LayerNorm):
                xh = F.layer_norm(a, mod.normalized_shape, eps=mod.eps)
                per = lambda t: t.reshape(b, -1, *mod.normalized_shape).sum(1)
            else:
                if isinstance(mod, nn.GroupNorm):
                    xh = F.group_norm(a, mod.num_groups, eps=mod.eps)
                elif mod.per_sample_stats:
                    xh = F.instance_norm(a, eps=mod.eps)
                else:
                    shape = (1, -1) + (1,) * (a.dim() - 2)
                    xh = (a - mod.running_mean.view(shape)) * torch.rsqrt(mod.running_var.view(shape) + mod.eps)
                per = lambda t: t.reshape(b, a.shape[1], -1).sum(2)
            sq[name[id(mod.weight)]] = per(g * xh).square().sum(0)
            gb = per(g)
        if mod.bias is not None:
            sq[name[id(mod.bias)]] = gb.square().sum(0)
    return sq


def _func_sq_grads(net, x, y, loss_fn):
    """{name: sum_i g_i^2} with torch.func: vmap over samples of the gradient of one sample's loss."""
    weights, buffers = dict(net.named_parameters()), dict(net.named_buffers())

    def sample_loss(w, xi, yi):
        return loss_fn(torch.func.functional_call(net, (w, buffers), (xi[None],)), yi[None])

    g = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0), randomness="different")(weights, x, y)
    return {n: gn.square().sum(0) for n, gn in g.items()}


class SSAMF(_SparseSAM):
    """SSAM-F: perturb the (1-s)·|w| entries with the largest empirical Fisher (Eq. 6).

    SSAM-F needs data, which step() does not see, so the training loop refreshes the mask:

        if opt.mask_update_due:                  # before the first step, then every update_interval steps
            opt.update_mask(model, batches)      # iterable of (inputs, targets); the first num_samples samples

    Stepping before any mask exists raises ValueError. With structure='N:M' the mask keeps the N entries of
    highest Fisher in each group (see nm_mask) and the density is N/M.
    """

    def __init__(self, params, base_optimizer, rho=0.05, sparsity=0.5, num_samples=128, update_interval=1000,
                 structure=None, norm=None, **kwargs):
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        super().__init__(params, base_optimizer, rho, sparsity, update_interval, structure, norm, **kwargs)
        self.num_samples = num_samples

    @torch.no_grad()
    def update_mask(self, model, data, loss_fn=None, chunk_size=32):
        """Fisher over num_samples samples of `data` (Eq. 5), then the top-(1-s)·|w| mask (Eq. 6)."""
        with torch.enable_grad():
            fisher = empirical_fisher(model, data, self.num_samples, loss_fn, chunk_size)
        missing = [p for p in self._params() if p not in fisher]
        if missing:
            raise ValueError(f"{len(missing)} optimizer parameters are not parameters of `model` (pass the model "
                             "they belong to; for DDP pass model.module)")
        self._set_masks(select_masks([fisher[p] for p in self._params()], 1 - self.sparsity, self.nm, self.costs))

    def _mask_for_step(self, params, grads):
        if self.last_mask_update < 0:
            raise ValueError("SSAMF has no mask yet: call opt.update_mask(model, data) before the first step "
                             "(opt.mask_update_due says when)")
        return super()._mask_for_step(params, grads)


# ----------------------------------------------------------------------------------------------------
# SSAM-D: the mask from dynamic sparse training (Eq. 7-9, Alg. 2 Option II)

class SSAMD(_SparseSAM):
    """SSAM-D: a random mask at exact density 1-s, refreshed every `update_interval` steps inside
    first_step with that step's gradient: drop the N_drop perturbed entries with the smallest |g| (Eq. 7),
    grow as many at random among the unperturbed (Eq. 8), N_drop = f_decay(t)·(1-s)·|w| with the cosine
    f_decay of Eq. 9 over `total_steps`. Growth draws from the optimizer's own generator (`seed`; saved in
    state_dict), so a resumed run grows the same entries as one run straight through.
    """

    def __init__(self, params, base_optimizer, rho=0.05, sparsity=0.5, drop_rate=0.5, update_interval=1000,
                 total_steps=None, structure=None, norm=None, seed=None, **kwargs):
        if not 0 <= drop_rate <= 1:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate!r}")
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"total_steps must be the run's number of steps (an integer >= 1), got {total_steps!r}")
        super().__init__(params, base_optimizer, rho, sparsity, update_interval, structure, norm, **kwargs)
        self.drop_rate, self.total_steps = drop_rate, total_steps
        params = self._params()
        self.generator = torch.Generator(device=params[0].device)
        self.generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
        self._set_masks(select_masks([self._rand(p) for p in params], 1 - sparsity, self.nm, self.costs))   # Alg. 1 l. 1

    def _rand(self, p):
        shape = () if self.nm == "tensor" else p.shape      # structure='tensor': one draw per tensor
        return torch.rand(shape, generator=self.generator, device=self.generator.device).to(p.device).expand(p.shape)

    def drop_count(self, t):
        """N_drop = f_decay(t; alpha)·(1-s)·|w| (Alg. 2 line 8, Eq. 9)."""
        f_decay = self.drop_rate / 2 * (1 + math.cos(t * math.pi / self.total_steps))
        return int(f_decay * (1 - self.sparsity) * sum(p.numel() for p in self._params()))

    @torch.no_grad()
    def update_mask(self, grads):
        """One drop-and-grow round with the gradients `grads` (one per parameter, None counts as zero)."""
        params = self._params()
        masks = self.masks()
        g = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]
        n_drop = self.drop_count(self.steps)
        # Eq. 7: among the perturbed entries, drop the n_drop with the smallest |g|
        drop_scores = [torch.where(m, gr.abs(), math.inf) for m, gr in zip(masks, g)]
        if self.nm == "tensor":                             # whole tensors, smallest mean |g| first, >= n_drop
            dropped = [torch.zeros_like(m) for m in masks]
            means = torch.stack([s.mean().to(drop_scores[0].device) for s in drop_scores]).tolist()
            count = 0
            for i in sorted(range(len(masks)), key=lambda i: means[i]):
                if count >= n_drop or means[i] == math.inf:
                    break
                dropped[i].fill_(True)
                count += masks[i].numel()
        else:
            dropped = topk_masks(drop_scores, n_drop, largest=False)
        kept = [m & ~d for m, d in zip(masks, dropped)]
        # Eq. 8: grow at random among the unperturbed: kept entries score 2, the rest uniform in [0, 1)
        grow_scores = [torch.where(k, 2.0, self._rand(p)) for k, p in zip(kept, params)]
        self._set_masks(select_masks(grow_scores, 1 - self.sparsity, self.nm, self.costs))

    def _mask_for_step(self, params, grads):
        if self.mask_update_due:
            by_param = {id(p): gr for p, gr in zip(params, grads)}
            self.update_mask([by_param.get(id(p)) for p in self._params()])
        return super()._mask_for_step(params, grads)


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class SAMON(_SparseSAM):
    """SAM-ON (Mueller et al., 2023): perturb only the parameters of normalization layers, chosen by module
    type (NORM_LAYERS), with the masked norm eps = rho·(g ⊙ m)/||g ⊙ m||, on the structure='tensor'
    machinery: wrap the first pass in `with opt.ascent_pass():` and backward skips every other weight
    gradient. The mask is fixed: it never needs an update."""

    def __init__(self, model, base_optimizer, rho=0.05, **kwargs):
        on = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
        if not on:
            raise ValueError("the model has no normalization layer with parameters: SAM-ON would perturb nothing")
        params = list(model.parameters())
        density = sum(p.numel() for p in params if id(p) in on) / sum(p.numel() for p in params)
        super().__init__(params, base_optimizer, rho, 1 - density, 1, "tensor", "masked", **kwargs)
        self._set_masks([torch.full_like(p, id(p) in on, dtype=torch.bool) for p in self._params()])

    @property
    def mask_update_due(self):
        return False


# ----------------------------------------------------------------------------------------------------
# The 2:4 sparse backward ("implicit" SSAM): dX = dY·(W ⊙ M) in the ascent pass of nn.Linear layers

class _MaskedInputGrad(torch.autograd.Function):
    """y = x W^T + b forward; backward: dX = dY (W ⊙ M), dW = dY^T X and db = sum dY as usual."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask):
        ctx.save_for_backward(x, weight, mask)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight, mask = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = sparse_input_grad(gy2, weight, mask).reshape(*gy.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            gw = gy2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)
        return gx, gw, gb, None


def sparse_input_grad(gy, weight, mask):
    """dX = dY (W ⊙ M) for 2-D dY [B, out]. On CUDA with fp16/bf16 and a 2:4 mask, (W ⊙ M)^T is compressed
    with torch.sparse.to_sparse_semi_structured (again each call, since W changes) and multiplied on the
    sparse tensor cores; everywhere else (CPU, fp32, shapes the kernel refuses) the same product runs dense."""
    wm = weight * mask
    key = (wm.shape, gy.shape, wm.dtype, wm.device)
    if wm.is_cuda and wm.dtype in (torch.float16, torch.bfloat16) and key not in _REFUSED:
        try:
            wt = torch.sparse.to_sparse_semi_structured(wm.t().contiguous())     # [in, out], 2:4 along out
            return (wt @ gy.t().contiguous()).t()
        except (RuntimeError, ValueError, NotImplementedError):
            _REFUSED.add(key)                               # kernel refused this shape/GPU: dense from now on
    return gy @ wm


_REFUSED = set()


@contextmanager
def sparse_ascent(model, opt):
    """Around the FIRST forward/backward: nn.Linear layers whose weight has an N:M mask in `opt` compute the
    input gradient with the masked weight, dX = dY·(W ⊙ M), through sparse_input_grad.

    This changes the ascent gradient (it is no longer the exact gradient at w: layers below a masked Linear
    see dY through W ⊙ M), so it is an approximation of SSAM, the "implicit" form of the authors' TPAMI
    follow-up. It touches one matmul of six per layer and pass pair (the ascent dX); convolutions cannot use
    it; the forward and the second pass stay dense and exact. torch.compile'd modules are not patched.
    """
    if getattr(opt, "nm", None) is None:
        raise ValueError("sparse_ascent needs an SSAMF/SSAMD optimizer built with structure='N:M' (e.g. '2:4')")
    patched = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and "mask" in opt.state.get(mod.weight, {}) and _nm_eligible(mod.weight, opt.nm):
            mask = opt.state[mod.weight]["mask"]
            mod.forward = (lambda x, mod=mod, mask=mask: _MaskedInputGrad.apply(x, mod.weight, mod.bias, mask))
            patched.append(mod)
    try:
        yield patched
    finally:
        for mod in patched:
            del mod.forward                             # back to nn.Linear.forward


# ----------------------------------------------------------------------------------------------------
# BatchNorm: running statistics follow the first pass only

@contextmanager
def frozen_bn_stats(model):
    """Around the SECOND forward/backward: BatchNorm layers in train mode still normalize with the batch's
    statistics but leave running_mean, running_var and num_batches_tracked untouched."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False                   # BatchNorm then neither updates nor counts
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True
