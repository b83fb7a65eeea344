"""Router ablation harness: which expert size, share definition, router objective and layer
allocation make PrunePath's cumulative-mass rule pay on smollm2-135m.

    python benchmarks/router_ablation.py capture            # once: per-layer (x, h) to /tmp
    python benchmarks/router_ablation.py run NAME [NAME..]  # designs, see DESIGNS
    python benchmarks/router_ablation.py table              # what has been measured
    python benchmarks/router_ablation.py proxy              # per-layer router screening
    python benchmarks/router_ablation.py sensitivity        # one FFN sparse at a time
    python benchmarks/router_ablation.py representative     # routers reading expert weight rows
    python benchmarks/router_ablation.py budget MODEL TAU.. # layer budget variants, real backend

Everything is fitted on the calibration text (calibration/text/wikitext2_calib.txt, its first
32 x 256-token windows, the first of the ones benchmarks/quality.py calibrates on) and screened by
perplexity on *other* windows of the calibration text (windows 64.. , disjoint from the fitting
windows), so that no design choice is tuned on the held-out evaluation text; the final numbers
come from benchmarks/quality.py on wikitext2_heldout.txt.

The sparse FFN here is a plain-torch replica of ppcompile.kernels.reference (the op's
semantics: linear router -> softmax -> keep the top experts until their mass reaches the FFN's
tau; kept experts exact), patched into the eager HF model, so that designs can be compared
without recompiling. Each design is evaluated at a few taus chosen so that the active fraction
predicted on calibration data brackets 0.5 and 0.8; perplexity is then interpolated (log space)
at the measured active fractions.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ppcompile import evaluate, models
from ppcompile.kernels.reference import expert_importance, select_experts, select_top_fraction
from ppcompile.passes.build_experts import _features, balanced_kmeans
from ppcompile.passes.train_routers import fit_log_shares, refine_cross_entropy

ROOT = Path(__file__).resolve().parent.parent
CALIB_TEXT = ROOT / "calibration" / "text" / "wikitext2_calib.txt"
CACHE = Path("/tmp/ppq")
LOG = CACHE / "ablation.jsonl"
MODEL = "smollm2-135m"
SEQ = 256
FIT_WINDOWS = 32       # windows 0..31 of the calibration text: capture (like quality.py)
VAL_START, VAL_WINDOWS = 64, 16  # screening windows, disjoint from the fitting ones
SAMPLE_TOKENS = 4096   # options.calibration_tokens was 4096 when these ablations ran (now 8192)
TARGETS = (0.5, 0.8)


# ---------------------------------------------------------------- data

def windows(tokenizer, val_windows=VAL_WINDOWS):
    text = CALIB_TEXT.read_text(encoding="utf-8")
    w = evaluate.token_windows(tokenizer, text, SEQ, None, None)
    return w[:FIT_WINDOWS], w[VAL_START:VAL_START + val_windows]


def mlps(model):
    return [layer.mlp for layer in model.model.layers]


def capture(model, fit):
    """Per layer: x (FFN input) and h (act(gate) * up) of every token of the fitting windows."""
    xs = [[] for _ in mlps(model)]
    hs = [[] for _ in mlps(model)]
    hooks = []
    for i, mlp in enumerate(mlps(model)):
        hooks.append(mlp.register_forward_pre_hook(
            lambda m, a, i=i: xs[i].append(a[0].reshape(-1, a[0].shape[-1]).clone())))
        hooks.append(mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: hs[i].append(a[0].reshape(-1, a[0].shape[-1]).clone())))
    with torch.no_grad():
        for batch in fit.split(8):
            model(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    return [torch.cat(x) for x in xs], [torch.cat(h) for h in hs]


def load_capture():
    return torch.load(CACHE / "capture.pt")


# ---------------------------------------------------------------- layer designs

@dataclass
class Layer:
    """One FFN's sparse form: neuron order, expert size, router (in permuted expert order),
    selection rule and a map from the global knob to this layer's tau."""

    perm: torch.Tensor
    size: int
    w_down: torch.Tensor                # permuted columns
    router_w: torch.Tensor | None = None
    router_b: torch.Tensor | None = None
    rule: str = "tau"                   # tau | topk | static | oracle
    power: float = 1.0                  # oracle: share = norm ** power
    static: torch.Tensor | None = None
    tau_map: object = None              # callable knob -> tau of this layer (None: identity)
    stats: list = field(default_factory=lambda: [0.0, 0.0])

    def tau(self, knob):
        return knob if self.tau_map is None else self.tau_map(knob)


def keep_of(layer: Layer, x2, h, knob):
    tau = layer.tau(knob)
    if layer.rule == "oracle":
        imp = expert_importance(h, layer.w_down, layer.size)
        return select_experts(imp.clamp_min(1e-30).log() * layer.power, tau)
    if layer.rule == "static":
        return select_top_fraction(layer.static.expand(x2.shape[0], -1), tau)
    logits = F.linear(x2, layer.router_w, layer.router_b)
    if layer.rule == "topk":
        return select_top_fraction(logits, tau)
    return select_experts(logits, tau)


class Patched:
    """Context: the model's MLPs run the sparse FFN of `layers` at global knob `knob`."""

    def __init__(self, model, layers):
        self.model, self.layers, self.knob = model, layers, 1.0

    def __enter__(self):
        for mlp, layer in zip(mlps(self.model), self.layers):
            mlp.forward = self._forward(mlp, layer)
        return self

    def __exit__(self, *exc):
        for mlp in mlps(self.model):
            del mlp.forward

    def _forward(self, mlp, layer):
        def forward(x):
            x2 = x.reshape(-1, x.shape[-1])
            h = (mlp.act_fn(mlp.gate_proj(x2)) * mlp.up_proj(x2))[:, layer.perm]
            keep = keep_of(layer, x2, h, self.knob)
            layer.stats[0] += keep.sum().item() * layer.size
            layer.stats[1] += x2.shape[0] * h.shape[1]
            h = h * keep.repeat_interleave(layer.size, 1).to(h.dtype)
            return F.linear(h, layer.w_down).reshape(*x.shape[:-1], -1)
        return forward

    def measure(self, knob, val):
        self.knob = knob
        for layer in self.layers:
            layer.stats[:] = [0.0, 0.0]
        ppl = evaluate.perplexity(self.model, val, 8)
        active = sum(l.stats[0] for l in self.layers) / sum(l.stats[1] for l in self.layers)
        per_layer = [l.stats[0] / l.stats[1] for l in self.layers]
        return ppl, active, per_layer


def predicted_fraction(layers, xs, hs, knob):
    """Mean active fraction on the calibration tokens (dense inputs) at `knob`."""
    total = 0.0
    for layer, x, h in zip(layers, xs, hs):
        total += keep_of(layer, x, h, knob).float().mean().item()
    return total / len(layers)


def knob_for(layers, xs, hs, fraction, rule):
    """The knob whose predicted active fraction is `fraction` (bisection; for topk/static the
    fraction itself, rounded per layer the way select_top_fraction does)."""
    if rule in ("topk", "static"):
        return fraction
    lo, hi = 0.0, 1.0
    for _ in range(18):
        mid = (lo + hi) / 2
        if predicted_fraction(layers, xs, hs, mid) < fraction:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# ---------------------------------------------------------------- fitting pieces

def fit_sample(x, h, seed=0, tokens=SAMPLE_TOKENS):
    """A uniform random subset of the captured tokens (as the calibrate pass samples), and the
    rest (held-out calibration tokens for proxies)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=gen)
    pick, rest = order[:tokens].sort().values, order[tokens:].sort().values
    return (x[pick], h[pick]), (x[rest], h[rest])


def cluster(h, size, seed=0, features="abs"):
    d_ff = h.shape[1]
    gen = torch.Generator().manual_seed(seed)
    z = _features(h) if features == "abs" else F.normalize(h[:2048].t(), dim=1)
    assign = balanced_kmeans(z, d_ff // size, size, gen)
    return torch.argsort(assign * d_ff + torch.arange(d_ff))


def shares(h, w_down, size, power=1.0):
    imp = expert_importance(h, w_down, size) ** power
    return imp / imp.sum(-1, keepdim=True).clamp_min(1e-30)


def kept_share(logits, share, tau):
    """Mean over tokens of the true share of the experts the tau rule keeps on `logits`."""
    keep = select_experts(logits, tau)
    return (share * keep).sum(-1).mean().item()


def temperature_for(x, w, b, share, tau_ref):
    """Scale a of the logits such that the tau rule at tau_ref keeps, on average, a true share
    tau_ref of the output (the softmax mass the rule sees then means output share)."""
    logits = F.linear(x, w, b)
    lo, hi = math.log(0.05), math.log(20.0)
    for _ in range(30):
        mid = (lo + hi) / 2
        # a larger scale makes the softmax peakier: fewer experts, less kept share
        if kept_share(logits * math.exp(mid), share, tau_ref) > tau_ref:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def rel_error(x, h, layer, w_down, knob):
    """Relative FFN output error ||y - y_sparse||^2 / ||y||^2 over tokens, and active fraction."""
    keep = keep_of(layer, x, h, knob)
    y = F.linear(h, w_down)
    ys = F.linear(h * keep.repeat_interleave(layer.size, 1).float(), w_down)
    return ((y - ys).square().sum() / y.square().sum()).item(), keep.float().mean().item()


# ---------------------------------------------------------------- designs

_PERMS = {}
_ROUTERS = {}


def prepared(size, cap, features="abs", tokens=SAMPLE_TOKENS):
    """Per layer (fit sample, held-out tokens, permuted w_down, perm) for one expert size."""
    key = (size, features, tokens)
    if key not in _PERMS:
        out = []
        for (x, h), w_down in zip(zip(cap["x"], cap["h"]), cap["w_down"]):
            (xf, hf), (xr, hr) = fit_sample(x, h, tokens=tokens)
            perm = cluster(hf, size, features=features)
            out.append(dict(x=xf, h=hf[:, perm], xr=xr, hr=hr[:, perm], perm=perm,
                            w_down=w_down[:, perm].contiguous()))
        if (CACHE / "resid.pt").is_file():  # residual stream before each FFN's add, same tokens
            for p, r, x in zip(out, torch.load(CACHE / "resid.pt")["r"], cap["x"]):
                (p["r"], _), _ = fit_sample(r, x, tokens=tokens)
        _PERMS[key] = out
    return _PERMS[key]


def build(cap, size=16, rule="tau", router="ridge", power=1.0, alloc="global", tau_ref=0.9,
          features="abs", tokens=SAMPLE_TOKENS, temp=1.0, ce_steps=100):
    """The layers of one design (see DESIGNS)."""
    layers = []
    for p in prepared(size, cap, features, tokens):
        share = shares(p["h"], p["w_down"], size, power)
        layer = Layer(perm=p["perm"], size=size, w_down=p["w_down"], rule=rule, power=power)
        if rule == "static":
            layer.static = share.mean(0).log()[None]
        elif rule != "oracle":
            key = (size, features, tokens, power, router, ce_steps, len(layers))
            if key not in _ROUTERS:  # designs that differ only after the fit share it
                w, b = fit_log_shares(p["x"], share)
                if router == "ce":
                    w, b = refine_cross_entropy(p["x"], share, w, b, steps=ce_steps)
                elif router != "ridge":
                    raise ValueError(router)
                _ROUTERS[key] = w, b
            w, b = _ROUTERS[key]
            if alloc == "temp":
                a = temperature_for(p["x"], w, b, share, tau_ref)
                w, b = w * a, b * a
            layer.router_w, layer.router_b = w / temp, b / temp
        layers.append(layer)
    if alloc == "equal":  # knob = target fraction; each layer's tau hits it on calibration data
        for layer, p in zip(layers, prepared(size, cap, features, tokens)):
            layer.tau_map = _equal_fraction_map(layer, p["x"], p["h"])
    if alloc in ("resid", "ffn"):  # knob = target mean fraction, split by a Lagrangian
        curves = [layer_curves(layer, p, alloc) for layer, p in
                  zip(layers, prepared(size, cap, features, tokens))]
        for layer, m in zip(layers, allocation_maps(curves)):
            layer.tau_map = m
    return layers


TAU_GRID = torch.cat([torch.linspace(0, 0.9, 91), torch.linspace(0.9, 1, 51)[1:]])


def layer_curves(layer, p, alloc):
    """(fraction[g], cost[g]) of this layer at each tau of TAU_GRID on the calibration sample.
    cost: dropped experts' squared output norm (cross terms ignored), relative to the squared
    norm of the residual stream after the FFN ("resid") or of the FFN output ("ffn"), mean over
    tokens."""
    x, h = p["x"], p["h"]
    imp = expert_importance(h, layer.w_down, layer.size)
    if layer.rule == "oracle":
        logits = imp.clamp_min(1e-30).log() * layer.power
    else:
        logits = F.linear(x, layer.router_w, layer.router_b)
    prob, order = logits.softmax(-1).sort(-1, descending=True)
    before = prob.cumsum(-1) - prob
    if layer.rule == "topk":  # rank only: the grid is then the kept fraction itself
        e = imp.shape[1]
        before = (torch.arange(e) / e).expand_as(prob)
    imp2 = imp.square().gather(-1, order)
    y = F.linear(h, layer.w_down)
    denom = (p["r"] + y if alloc == "resid" else y).square().sum(-1, keepdim=True)
    kept_cost = torch.cat([torch.zeros(len(x), 1), (imp2 / denom).cumsum(-1)], 1)
    total = kept_cost[:, -1:]
    fr, cost = [], []
    for tau in TAU_GRID.tolist():
        k = (before < tau).sum(-1, keepdim=True) if tau < 1 else torch.full((len(x), 1), imp.shape[1])
        fr.append(k.float().mean().item() / imp.shape[1])
        cost.append((total - kept_cost.gather(-1, k)).mean().item())
    return np.array(fr), np.array(cost)


def allocation_maps(curves, fractions=np.linspace(0.2, 1.0, 81)):
    """Per layer, a map target mean fraction -> tau: for each target, the taus minimising the
    summed cost at that mean fraction (Lagrangian relaxation over the grid)."""
    taus = TAU_GRID.numpy()
    table = np.ones((len(curves), len(fractions)))
    for j, target in enumerate(fractions):
        if target >= 0.999:
            continue
        lo, hi = -30.0, 10.0
        for _ in range(60):
            lam = (lo + hi) / 2
            picks = [np.argmin(c + math.exp(lam) * f) for f, c in curves]
            mean = np.mean([f[i] for (f, c), i in zip(curves, picks)])
            if mean > target:
                lo = lam
            else:
                hi = lam
        picks = [np.argmin(c + math.exp(hi) * f) for f, c in curves]
        table[:, j] = taus[picks]
    return [lambda f, row=row: float(np.interp(f, fractions, row)) for row in table]


def _equal_fraction_map(layer, x, h):
    grid = torch.linspace(0.0, 1.0, 401)
    fr = torch.tensor([keep_of(layer, x, h, float(t)).float().mean().item() for t in grid])
    fr = torch.cummax(fr, 0).values.numpy()
    g = grid.numpy()
    return lambda f: float(np.interp(f, fr + np.arange(len(fr)) * 1e-9, g))


def finetune_e2e(model, layers, fit, prep, epochs=2, lr=1e-3, grad="st", temp=0.05,
                 fractions=(0.4, 0.95), batch=4, seed=0, loss="kl"):
    """End-to-end router fine-tuning: the model's weights frozen, the routers (W, b) trained by
    Adam to minimise KL(dense || sparse) of the next-token distributions on the fitting windows.
    Forward: each FFN keeps experts by the cumulative-mass rule at the threshold that keeps, on
    this batch, the fraction its layer budget gives it at a mean fraction drawn uniformly from
    `fractions` (so the training cannot buy quality with a larger budget). Backward ("st"):
    y = sum_e (keep_e + p_e - sg(p_e)) y_e, i.e. dL/dp_e = dL/dy . y_e; ("soft"):
    sigmoid((threshold - mass ranked above e) / temp) in place of p_e. Then the layer budget is
    refitted on the trained routers (dense calibration inputs, as the pass does). loss="mse":
    mean squared error of the logits instead of the KL."""
    if loss not in ("kl", "mse") or grad not in ("st", "soft"):
        raise ValueError(f"finetune_e2e: loss {loss!r} / grad {grad!r}")
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.requires_grad_(False)
    curves = [layer_curves(layer, p, "resid") for layer, p in zip(layers, prep)]
    grid = TAU_GRID.numpy()
    with torch.no_grad():
        teacher = torch.cat([model(input_ids=b, use_cache=False).logits for b in fit.split(batch)])
        if loss == "kl":
            teacher = teacher.log_softmax(-1)
    params = []
    for layer in layers:
        layer.router_w = layer.router_w.clone().requires_grad_(True)
        layer.router_b = layer.router_b.clone().requires_grad_(True)
        params += [layer.router_w, layer.router_b]
    opt = torch.optim.Adam(params, lr)
    target = {}

    def forward_of(mlp, i, layer):
        def forward(x):
            x2 = x.reshape(-1, x.shape[-1])
            h = (mlp.act_fn(mlp.gate_proj(x2)) * mlp.up_proj(x2))[:, layer.perm]
            p = F.linear(x2, layer.router_w, layer.router_b).softmax(-1)
            ps, order = p.sort(-1, descending=True)
            before = torch.empty_like(p).scatter(-1, order, ps.cumsum(-1) - ps)
            k = max(1, min(before.numel(), math.ceil(target[i] * before.numel())))
            threshold = before.detach().flatten().kthvalue(k).values
            keep = (before.detach() <= threshold).float()
            soft = p if grad == "st" else torch.sigmoid((threshold - before) / temp)
            mask = keep + soft - soft.detach()
            y = F.linear(h * mask.repeat_interleave(layer.size, 1), layer.w_down)
            return y.reshape(*x.shape[:-1], -1)
        return forward

    for i, (mlp, layer) in enumerate(zip(mlps(model), layers)):
        mlp.forward = forward_of(mlp, i, layer)
    start = time.perf_counter()
    try:
        for epoch in range(epochs):
            total, steps = 0.0, 0
            order = torch.randperm(len(fit), generator=gen)
            for s in range(0, len(fit) - batch + 1, batch):
                idx = order[s:s + batch]
                f = fractions[0] + (fractions[1] - fractions[0]) * torch.rand(1, generator=gen).item()
                for i, layer in enumerate(layers):
                    target[i] = float(np.interp(layer.tau(f), grid, curves[i][0]))
                out = model(input_ids=fit[idx], use_cache=False).logits
                t = teacher[idx]
                if loss == "kl":
                    value = (t.exp() * (t - out.log_softmax(-1))).sum(-1).mean()
                else:
                    value = (out - t).square().mean()
                opt.zero_grad()
                value.backward()
                opt.step()
                total, steps = total + value.item(), steps + 1
            print(f"  e2e epoch {epoch}: mean {loss} {total / steps:.4f} "
                  f"[{time.perf_counter() - start:.0f} s]", flush=True)
    finally:
        for mlp in mlps(model):
            del mlp.forward
    for layer in layers:
        layer.router_w, layer.router_b = layer.router_w.detach(), layer.router_b.detach()
    new_curves = [layer_curves(layer, p, "resid") for layer, p in zip(layers, prep)]
    for layer, m in zip(layers, allocation_maps(new_curves)):
        layer.tau_map = m


DESIGNS = {
    # name: build kwargs
    "oracle16": dict(size=16, rule="oracle"),
    "oracle8": dict(size=8, rule="oracle"),
    "oracle16_sq": dict(size=16, rule="oracle", power=2.0),
    "oracle8_sq": dict(size=8, rule="oracle", power=2.0),
    "oracle16_equal": dict(size=16, rule="oracle", alloc="equal"),
    "oracle8_equal": dict(size=8, rule="oracle", alloc="equal"),
    "ridge16": dict(size=16),
    "ridge16_topk": dict(size=16, rule="topk"),
    "ridge16_equal": dict(size=16, alloc="equal"),
    "ridge8": dict(size=8),
    "ridge8_topk": dict(size=8, rule="topk"),
    "ridge8_equal": dict(size=8, alloc="equal"),
    "static16": dict(size=16, rule="static"),
    "ce16": dict(size=16, router="ce"),
    "ce16_temp": dict(size=16, router="ce", alloc="temp"),
    "ridge16_temp": dict(size=16, alloc="temp"),
    "oracle8_resid": dict(size=8, rule="oracle", alloc="resid"),
    "ridge8_resid": dict(size=8, alloc="resid"),
    "ridge8_ffnalloc": dict(size=8, alloc="ffn"),
    "ridge8_resid_t05": dict(size=8, alloc="resid", temp=0.5),
    "ridge8_resid_t2": dict(size=8, alloc="resid", temp=2.0),
    "topk8_resid": dict(size=8, rule="topk", alloc="resid"),
    "ridge8_resid_8k": dict(size=8, alloc="resid", tokens=8192),
    "ce8_resid": dict(size=8, router="ce", alloc="resid"),
    "ce8_resid_8k": dict(size=8, router="ce", alloc="resid", tokens=8192),
    "ce8_topk_8k": dict(size=8, router="ce", rule="topk", tokens=8192),
    "ce8_8k": dict(size=8, router="ce", tokens=8192),
    "ridge8_topk_8k": dict(size=8, rule="topk", tokens=8192),
    "ce8_resid_8k_steps30": dict(size=8, router="ce", alloc="resid", tokens=8192, ce_steps=30),
    "ce8_topk_resid_8k": dict(size=8, router="ce", rule="topk", alloc="resid", tokens=8192),
    "oracle8_8k": dict(size=8, rule="oracle", tokens=8192),
    "static8_8k": dict(size=8, rule="static", tokens=8192),
    "ce4_resid_8k": dict(size=4, router="ce", alloc="resid", tokens=8192),
    "oracle4_8k": dict(size=4, rule="oracle", tokens=8192),
    # end-to-end router fine-tuning (finetune_e2e) on top of ce8_resid_8k
    "e2e_st": dict(size=8, router="ce", alloc="resid", tokens=8192, e2e=dict()),
    "e2e_soft": dict(size=8, router="ce", alloc="resid", tokens=8192, e2e=dict(grad="soft")),
    "e2e_st_ep4": dict(size=8, router="ce", alloc="resid", tokens=8192, e2e=dict(epochs=4)),
    "e2e_st_b8": dict(size=8, router="ce", alloc="resid", tokens=8192, e2e=dict(batch=8)),
    "e2e_st_b8_lr3": dict(size=8, router="ce", alloc="resid", tokens=8192,
                          e2e=dict(batch=8, lr=3e-3)),
    "e2e_st_mse": dict(size=8, router="ce", alloc="resid", tokens=8192, e2e=dict(loss="mse")),
    "e2e_st_ridge": dict(size=8, alloc="resid", tokens=8192, e2e=dict()),
}


def run_design(name, model, cap, val, targets=TARGETS, spread=0.04, fractions=None,
               fit=None):
    kwargs = dict(DESIGNS[name])
    e2e = kwargs.pop("e2e", None)
    t0 = time.perf_counter()
    layers = build(cap, **kwargs)
    if e2e is not None:
        finetune_e2e(model, layers, fit, prepared(kwargs.get("size", 16), cap,
                                                 kwargs.get("features", "abs"),
                                                 kwargs.get("tokens", SAMPLE_TOKENS)), **e2e)
    fit_s = time.perf_counter() - t0
    prep = prepared(kwargs.get("size", 16), cap, kwargs.get("features", "abs"),
                    kwargs.get("tokens", SAMPLE_TOKENS))
    xs, hs = [p["x"] for p in prep], [p["h"] for p in prep]
    rule = kwargs.get("rule", "tau")
    alloc = kwargs.get("alloc", "global")
    points = []
    wanted = fractions or [f for t in targets for f in (t - spread, t + spread)]
    with Patched(model, layers) as patched:
        for f in wanted:
            if True:
                if rule in ("topk", "static") or alloc in ("equal", "resid", "ffn"):
                    knob = f
                else:
                    knob = knob_for(layers, xs, hs, f, rule)
                t = time.perf_counter()
                ppl, active, per_layer = patched.measure(knob, val)
                points.append(dict(knob=knob, ppl=ppl, active=active, per_layer=per_layer))
                print(f"  {name} knob={knob:.4f} active={active:.4f} ppl={ppl:.3f} "
                      f"[{time.perf_counter() - t:.0f} s]", flush=True)
    pts = sorted((p["active"], p["ppl"]) for p in points)
    xsv, ysv = np.array([p[0] for p in pts]), np.log([p[1] for p in pts])
    at = {str(t): float(np.exp(np.interp(t, xsv, ysv))) for t in targets}
    row = dict(name=name, kwargs=DESIGNS[name], fit_seconds=round(fit_s, 1), at=at, points=points,
               val_windows=len(val))
    with open(LOG, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{name}: " + ", ".join(f"ppl@{t}={v:.3f}" for t, v in at.items()), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["capture", "run", "table", "dense", "proxy", "sensitivity",
                                    "budget", "representative"])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    ap.add_argument("--fractions", type=float, nargs="+", default=None,
                    help="predicted active fractions to evaluate at (default: targets +- 0.04)")
    ap.add_argument("--val-windows", type=int, default=VAL_WINDOWS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    CACHE.mkdir(exist_ok=True)
    if args.cmd == "table":
        return table()
    if args.cmd == "proxy":
        return proxy(load_capture())
    if args.cmd == "representative":
        return representative(load_capture())
    if args.cmd == "budget":
        return budget_variants(args.names[0], [float(t) for t in args.names[1:]])
    model, tokenizer = models.load(MODEL)
    fit, val = windows(tokenizer, args.val_windows)
    if args.cmd == "capture":
        xs, hs = capture(model, fit)
        w_down = [m.down_proj.weight.detach().clone() for m in mlps(model)]
        torch.save(dict(x=xs, h=hs, w_down=w_down), CACHE / "capture.pt")
        return 0
    if args.cmd == "dense":
        ppl = evaluate.perplexity(model, val, 8)
        with open(LOG, "a") as f:
            f.write(json.dumps(dict(name="dense", ppl=ppl, val_windows=len(val))) + "\n")
        print("dense", ppl)
        return 0
    cap = load_capture()
    if args.cmd == "sensitivity":
        return sensitivity(model, cap, val)
    for name in args.names:
        run_design(name, model, cap, val, tuple(args.targets), fractions=args.fractions,
                   fit=fit)
    return 0


def _mlp_router(x, share, hidden=512, steps=3000):
    """A 2-layer MLP router (d -> hidden -> E, GELU), cross-entropy to the shares, Adam: what a
    router shape the op does not take would gain."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(),
                              torch.nn.Linear(hidden, share.shape[1]))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (256,), generator=gen)
        loss = -(share[idx] * net(x[idx]).log_softmax(-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return lambda z: net(z).detach()


def proxy(cap, size=8, layers=range(0, 30, 3), fractions=(0.5, 0.8)):
    """Screening without perplexity: relative FFN output error ||y - y_sparse||^2 / ||y||^2 on
    held-out calibration tokens (4096 fitted, 2048 of the other 4096 scored), every third layer,
    each layer at the same active fraction (its own tau), for router objectives and shapes;
    'oracle' ranks by the true output norms."""
    routers = {
        "ridge (log shares)": lambda x, s: (lambda w, b: lambda z: F.linear(z, w, b))(
            *fit_log_shares(x, s)),
        "ridge + cross-entropy (L-BFGS)": lambda x, s: (lambda w, b: lambda z: F.linear(z, w, b))(
            *refine_cross_entropy(x, s, *fit_log_shares(x, s))),
        "MLP 512, cross-entropy (Adam)": _mlp_router,
    }
    rows = []
    for name, fitter in [*routers.items(), ("oracle", None)]:
        t0 = time.perf_counter()
        per = []
        for layer in layers:
            p = prepared(size, cap)[layer]
            xr, hr = p["xr"][:2048], p["hr"][:2048]
            share = shares(p["h"], p["w_down"], size)
            if fitter is None:
                logits = expert_importance(hr, p["w_down"], size).clamp_min(1e-30).log()
            else:
                logits = fitter(p["x"], share)(xr)
            per.append(_proxy_errors(logits, hr, p["w_down"], size, fractions))
        mean = np.mean(per, 0)
        rows.append([name, *[round(v, 4) for v in mean], round(time.perf_counter() - t0)])
        print(rows[-1], flush=True)
    with open(LOG, "a") as f:
        f.write(json.dumps(dict(name="proxy", size=size, fractions=fractions, rows=rows)) + "\n")
    return 0


def _proxy_errors(logits, h, w_down, size, fractions):
    """Relative output error at each fraction, topk then the tau rule (tau bisected to it)."""
    def err(keep):
        y = F.linear(h, w_down)
        ys = F.linear(h * keep.repeat_interleave(size, 1).float(), w_down)
        return ((y - ys).square().sum() / y.square().sum()).item()

    def tau_at(f):
        lo, hi = 0.0, 1.0
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if select_experts(logits, mid).float().mean() < f else (lo, mid)
        return (lo + hi) / 2

    return [e for f in fractions
            for e in (err(select_top_fraction(logits, f)), err(select_experts(logits, tau_at(f))))]


def representative(cap, size=8, layers=range(0, 30, 3), fractions=(0.5, 0.8)):
    """Screening as `proxy`, for a router that reads k neurons of each expert (their gate and up
    rows: about the linear router's bytes at k = 1, and the kept experts' reps are computed
    anyway): logits = a_e log(contribution of the expert's k best-tracking neurons) + b_e, fitted
    on the sample; the neurons are the k whose log contribution |h_n| ||w_down[:, n]|| correlates
    best with the expert's log importance."""
    rows = []
    for k in (1, 2):
        per = []
        for layer in layers:
            p = prepared(size, cap)[layer]
            hr = p["hr"][:2048]
            per.append(_proxy_errors(_rep_router(p["h"], p["w_down"], size, k)(hr), hr,
                                     p["w_down"], size, fractions))
        rows.append([f"{k} representative neuron(s) per expert",
                     *[round(v, 4) for v in np.mean(per, 0)]])
        print(rows[-1], flush=True)
    rows += _rank1_routers(cap, size, layers, fractions)
    with open(LOG, "a") as f:
        f.write(json.dumps(dict(name="representative", size=size, fractions=fractions,
                                rows=rows)) + "\n")
    return 0


def _rank1_routers(cap, size, layers, fractions):
    """The linear router (ridge + CE) plus, per expert, log |v_e x| of the rank-1 summary v_e of
    its up rows (and log |silu(g_e x)| of its gate rows): what a linear router cannot see (|up x|
    is even in x), for one or two more rows per expert; per-expert least squares on log shares."""
    model, _ = models.load(MODEL)
    blocks = mlps(model)
    errors = {"linear (ridge + CE)": [], "+ rank-1 |up|": [], "+ rank-1 |up|, |silu(gate)|": []}
    for layer in layers:
        p = prepared(size, cap)[layer]
        x, xr, hr = p["x"], p["xr"][:2048], p["hr"][:2048]
        share = shares(p["h"], p["w_down"], size)
        experts = share.shape[1]
        w, b = refine_cross_entropy(x, share, *fit_log_shares(x, share))

        def rank1(weight):
            u, sv, vh = torch.linalg.svd(weight.detach()[p["perm"]].float().view(experts, size, -1),
                                         full_matrices=False)
            return vh[:, 0, :] * sv[:, :1]

        up, gate = rank1(blocks[layer].up_proj.weight), rank1(blocks[layer].gate_proj.weight)

        def columns(z, n_extra):
            cols = [F.linear(z, w, b), (z @ up.t()).abs().clamp_min(1e-6).log(),
                    F.silu(z @ gate.t()).abs().clamp_min(1e-6).log()][:1 + n_extra]
            return torch.stack(cols + [torch.ones(z.shape[0], experts)], -1).transpose(0, 1)

        target = share.clamp_min(1e-6 / experts).log().t()[:, :, None]
        for n_extra, name in enumerate(errors):
            if n_extra == 0:
                logits = F.linear(xr, w, b)
            else:
                coef = torch.linalg.lstsq(columns(x, n_extra), target).solution
                logits = (columns(xr, n_extra) @ coef).squeeze(-1).t()
            errors[name].append(_proxy_errors(logits, hr, p["w_down"], size, fractions))
    rows = [[name, *[round(v, 4) for v in np.mean(e, 0)]] for name, e in errors.items()]
    for row in rows:
        print(row, flush=True)
    return rows


def _rep_router(h, w_down, size, k):
    n, d_ff = h.shape
    experts = d_ff // size
    norms = w_down.norm(dim=0)
    imp = expert_importance(h, w_down, size)
    log_c = (h.abs() * norms).clamp_min(1e-12).log().view(n, experts, size)
    log_i = imp.clamp_min(1e-12).log()[:, :, None]
    log_c, log_i = log_c - log_c.mean(0), log_i - log_i.mean(0)
    corr = (log_c * log_i).sum(0) / (log_c.norm(dim=0) * log_i.norm(dim=0)).clamp_min(1e-12)
    reps = (corr.topk(k, dim=1).indices + torch.arange(experts)[:, None] * size).flatten()

    def features(hh):
        c = (hh[:, reps].abs() * norms[reps]).view(hh.shape[0], experts, k)
        return c.square().sum(-1).sqrt().clamp_min(1e-12).log()

    f = features(h)
    t = (imp / imp.sum(-1, keepdim=True)).clamp_min(1e-6 / experts).log()
    a = ((f - f.mean(0)) * (t - t.mean(0))).sum(0) / (f - f.mean(0)).square().sum(0).clamp_min(1e-12)
    b = t.mean(0) - a * f.mean(0)
    return lambda hh: a * features(hh) + b


def sensitivity(model, cap, val, size=8, fraction=0.5):
    """Perplexity with only FFN l sparse (ridge router, its tau set for `fraction` of its experts
    on calibration data), for each l: which layers the budget should protect."""
    layers = build(cap, size=size)
    taus = []
    for layer, p in zip(layers, prepared(size, cap)):
        lo, hi = 0.0, 1.0
        for _ in range(18):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if keep_of(layer, p["x"], p["h"], mid).float().mean() < fraction \
                else (lo, mid)
        taus.append((lo + hi) / 2)
    rows = []
    with Patched(model, layers) as patched:
        for l in range(len(layers)):
            for j, layer in enumerate(layers):
                layer.tau_map = (lambda k, t=taus[j]: t) if j == l else (lambda k: 1.0)
            ppl, _, per_layer = patched.measure(1.0, val)
            rows.append(dict(layer=l, ppl=ppl, active=per_layer[l]))
            print(rows[-1], flush=True)
    with open(LOG, "a") as f:
        f.write(json.dumps(dict(name="sensitivity", size=size, fraction=fraction, rows=rows)) + "\n")
    return 0


def budget_variants(name, taus, exponents=(1.0, 0.5, 0.0)):
    """Through the real backend (32 calibration windows, 64 for MiniLM): the prunepath curve
    with layer budgets whose residual weight is raised to each exponent (1 = the pass's cost,
    0 = no residual weight), and with no budget (the model-wide tau), then topk on the same
    plan; screening windows of the calibration text after the calibration windows."""
    import importlib

    import ppcompile
    from ppcompile.ffn import REGISTRY
    passes = importlib.import_module("ppcompile.passes.train_routers")
    model, tokenizer = models.load(name)
    causal = name != "minilm-l6"
    bos = evaluate.bos_for(model, tokenizer) if causal else tokenizer.cls_token_id
    w = evaluate.token_windows(tokenizer, CALIB_TEXT.read_text(encoding="utf-8"),
                               256 if causal else 128, None, bos)
    ncal = 32 if causal else 64
    count = 12 if name.startswith("gemma") else 16 if causal else 32
    calib, val = w[:ncal], w[ncal + 32:ncal + 32 + count]
    bs = 4 if name.startswith("gemma") else 8
    curves = {p: [] for p in exponents}
    real = passes.budget_curve

    def recording(sample, *a, **k):
        for p in exponents:
            curves[p].append(real({**sample, "weight": sample["weight"].clamp_min(1e-12) ** p},
                                  *a, **k))
        return real(sample, *a, **k)

    passes.budget_curve = recording
    if causal:
        dense = evaluate.perplexity(model, val, bs)
        measure = lambda m: evaluate.perplexity(m, val, bs) / dense  # noqa: E731
    else:
        measure = lambda m: evaluate.embedding_cosine(model, m, val, bs)  # noqa: E731
    compiled = torch.compile(model, backend="prunepath",
                             options={"tau": 1.0, "calibration": calib, "cache": False})
    measure(compiled)
    states = REGISTRY.states_of(list(model.parameters()))
    result = {}
    for p in (*exponents, None):
        # the plan passes make budget tables several times (routers fitted, distilled, at each
        # temperature tried): the last ones made are the plan's
        tables = passes.layer_budgets(curves[p][-len(states):], [s.d_ff for s in states]) \
            if p is not None else [None] * len(states)
        for s, t in zip(states, tables):
            s.tau_table = None if t is None else torch.stack([passes.TAU_GRID, t]).float()
        pts = []
        for tau in taus:
            ppcompile.set_tau(compiled, tau)
            value = measure(compiled)
            pts.append((ppcompile.report(compiled).active_fraction, value))
        result[str(p)] = sorted(pts)
        print(name, "residual weight exponent" if p is not None else "no budget", p,
              [(round(a, 3), round(v, 4)) for a, v in sorted(pts)], flush=True)
    torch._dynamo.reset()
    topk = torch.compile(model, backend="prunepath", options={
        "tau": 1.0, "calibration": calib, "cache": False, "method": "topk"})
    measure(topk)
    pts = []
    for fraction in (0.5, 0.6, 0.7, 0.8, 0.9):
        ppcompile.set_tau(topk, fraction)
        pts.append((fraction, measure(topk)))
    result["topk"] = pts
    print(name, "topk", [(a, round(v, 4)) for a, v in pts], flush=True)
    with open(LOG, "a") as f:
        f.write(json.dumps(dict(name="budget", model=name, result=result)) + "\n")
    return 0


def table():
    rows = [json.loads(line) for line in open(LOG)]
    dense = {r.get("val_windows", VAL_WINDOWS): r["ppl"] for r in rows if r["name"] == "dense"}
    for r in rows:
        if "at" in r:
            n = r.get("val_windows", VAL_WINDOWS)
            print(f"{r['name']:18s} {n:3d} win " + " ".join(
                f"{t}: {v / dense[n]:.3f}" for t, v in r["at"].items()) + f"  fit {r['fit_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
