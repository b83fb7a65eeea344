"""Pass 6: end-to-end router fine-tuning, by distillation through the frozen model.

Matches: FFNs whose plan train_routers made in this compile (they still hold their calibration
sample), when options.distill_epochs > 0 and there are two calibration batches or more (with the
call's own inputs only, there is nothing to hold out for the check).
train_routers fits each router alone, to its FFN's expert output shares. Here all routers train
together on what the model outputs:
- a copy of the graph runs with each such FFN sparse, its output W_down (h * mask) with the
  straight-through mask keep_e + p_e - sg(p_e) (p: the router's softmax), so the selection is the
  real one while dL/dp_e = dL/dy . W_down[:, e] h_e reaches the router;
- every update draws a mean active fraction in [0.4, 0.95] and each FFN keeps, over the update's
  tokens, the share of experts its layer budget gives it there (those with the least router mass
  ranked above them): training cannot buy quality with a larger budget, and one set of routers
  serves every tau;
- loss: KL(dense || sparse) of the next-token distribution when an output looks like logits
  (last dimension >= 4 x the widest FFN input), else the relative squared error of all floating
  outputs (encoders);
- the student's matrix products in bfloat16 where the device has them natively and the weights
  are float32 (calibrate.plan_precision; its routers in float32), as were the teacher's, the
  dense outputs calibrate kept;
- where the layer budget is kept, the routers of the first FIXED_SHARE of the FFNs (graph order)
  keep train_routers' fit, so the backward pass stops at the lowest trained router: the budget
  leaves those FFNs most of their experts (SmolLM2's first ten keep 93-100% at a mean of 80%,
  53-100% at 50%), and distilling them there bought nothing measurable: SmolLM2's plan passes
  171 s instead of 187, held-out ratios within 1% either way. Without the budget every FFN runs
  at the model-wide tau, and on Gemma-3 fixing them cost 0.5-1% (router_ablation.md, Q);
- Adam on the trained routers only, each one's lr DISTILL_LR / RMS of its FFN's input (so a step
  moves router logits alike whatever the input's scale), options.distill_epochs passes over the
  calibration batches but the first (the check batch, held out, so that the checks after
  training see tokens it did not fit), one update per >= TOKENS_PER_UPDATE
  tokens, against the dense outputs calibrate kept (recomputed per batch where they did not fit
  its memory budget); batches whose dense outputs are not finite are skipped;
- then the layer budget's tables are refitted on the trained routers (the budget check's verdict
  stands), and the trained routers are kept only if the same loss on the budget check's batch, at
  its lower active fraction, is below that of the fitted routers (not the check's relative L2
  error of raw logits: on SmolLM2 distillation halved the KL and raised that error); stderr says
  which.
Measured (benchmarks/results/router_ablation.md, sections F and G): SmolLM2-135M, screening
windows, perplexity ratio to dense 2.75 -> 2.25 at 50% active, 1.30 -> 1.24 at 80%; with one lr
for all routers (3e-3) distillation diverged on Gemma-3-270M (dropped by the check), with the
scale-free lr it is kept there (held-out ratio at 50% active 2.04 -> 1.92).
Guarantees: the graph, the model's weights and the graph's inputs are unchanged; only routers
and tau tables change (in place, same tensors); tau = 1.0 still keeps every expert; the
calibration samples and the kept dense outputs stay for choose_temperature (which releases them).
Deterministic for a given seed.
"""
from __future__ import annotations

import math
import sys
import time
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..kernels.reference import kept_down
from .calibrate import (calibration_batches, floating_leaves, floating_outputs, no_autocast,
                        plan_precision)
from .train_routers import (LOGITS_WIDTH, TAU_GRID, budget_tables, distill_backward,
                            fresh_inputs, model_tau_for, sparse_copy, sparse_loss,
                            with_ffn_outputs)

DISTILL_LR = 5e-4  # Adam's lr for a router times the RMS of its FFN's input
FRACTIONS = (0.4, 0.95)   # mean active fractions the updates are drawn from
TOKENS_PER_UPDATE = 2048  # gradients of smaller batches accumulate up to this many tokens
FIXED_SHARE = 1 / 3  # with a layer budget: the first FFNs' routers keep their fitted values


def distill_routers(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    ffns = gm.meta["ppcompile_ffns"]
    planned = [(f, f.weights(ctx.values)) for f in ffns if f.planned_now and f.sample is not None]
    if planned and ctx.options.distill_epochs > 0:
        _distill(gm, ctx, planned)
    return gm


def _distill(gm, ctx, planned):
    opts = ctx.options
    states = [ffn.state for ffn, _ in planned]
    fitted = [(s.router_w.clone(), s.router_b.clone(), s.tau_table) for s in states]
    verdict = gm.meta["ppcompile_budget"]
    logits_width = LOGITS_WIDTH * max(ffn.d_model for ffn, _ in planned)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # calibrate has warned already if data is missing
        batches = calibration_batches(gm, ctx)
    if len(batches) < 2:
        # one batch (the call's own inputs): training on the check batch could not be checked
        print("ppcompile: router distillation skipped: a single calibration batch",
              file=sys.stderr)
        return
    check_tau = verdict["taus"][0]  # the lower of check_budget's active fractions
    # calibrate kept the dense outputs of the batches that fit (check_budget: batch 0 always);
    # check_budget ran batch 0 sparse at check_tau on the fitted routers
    dense_kept, loss_before = gm.meta["ppcompile_dense"], verdict.pop("loss")
    gen = torch.Generator().manual_seed(opts.seed)
    start = time.perf_counter()
    # the compile may run under no_grad or inference_mode: train on plain tensors
    with torch.inference_mode(False), torch.enable_grad():
        fixed = int(len(planned) * FIXED_SHARE) if verdict["kept"] else 0
        routers = [(s.router_w.detach().float().clone().requires_grad_(i >= fixed),
                    s.router_b.detach().float().clone().requires_grad_(i >= fixed))
                   for i, s in enumerate(states)]
        targets = [1.0] * len(planned)
        # FFN i sparse under routers[i], keeping the share targets[i] of its experts
        student = with_ffn_outputs(gm, planned, [
            _straight_through(i, routers, targets, _detached(w), ffn.state)
            for i, (ffn, w) in enumerate(planned)])
        # Adam moves every weight by about lr per step, which moves a router's logits in
        # proportion to its input's scale: scale-free steps (Gemma-3's FFN inputs are ~5x
        # SmolLM2's; one lr for both diverged there)
        optimizer = torch.optim.Adam([
            {"params": list(r), "lr": DISTILL_LR / _rms(ffn.sample["x"])}
            for r, (ffn, _) in list(zip(routers, planned))[fixed:]])
        fraction_of = _fractions(planned, verdict["curves"])
        data = opts.calibration
        # a 1-D token stream counts all its tokens (it is cut into windows as [N, T] rows are)
        tokens = data.shape[:2].numel() if data is not None else 1
        per_update = max(1, math.ceil(TOKENS_PER_UPDATE * len(batches) / max(tokens, 1)))
        train = list(range(1, len(batches)))
        precision = plan_precision(gm, planned)
        frozen = [p for p in gm.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            losses, grad_buffer, finite = [], None, {}  # finite: batch -> outputs finite
            for _ in range(opts.distill_epochs):
                order = [train[i] for i in torch.randperm(len(train), generator=gen).tolist()]
                for first in range(0, len(order), per_update):
                    mean = FRACTIONS[0] + (FRACTIONS[1] - FRACTIONS[0]) * float(
                        torch.rand((), generator=gen))
                    targets[:] = fraction_of(mean)
                    optimizer.zero_grad()
                    group = order[first:first + per_update]
                    total = 0.0
                    for index in group:
                        if not finite.get(index, True):
                            continue
                        dense = dense_kept.get(index)
                        if dense is None:  # not kept by calibrate: made as it makes them
                            with torch.no_grad(), precision:
                                dense = floating_outputs(gm(*fresh_inputs(batches[index])))
                        if index not in finite:  # checked once per batch
                            # NaN / inf targets (a float16 model overflowing) would make every
                            # router NaN in one step
                            finite[index] = all(bool(t.isfinite().all()) for t in dense)
                            if not finite[index]:
                                continue
                        with precision:
                            got = floating_leaves(student(*fresh_inputs(batches[index])))
                        loss, grad_buffer = distill_backward(got, dense, logits_width,
                                                             1.0 / len(group), grad_buffer)
                        total += loss / len(group)
                    optimizer.step()
                    losses.append(total)
        finally:
            for p in frozen:
                p.requires_grad_(True)
    with torch.no_grad():
        for state, (w, b) in zip(states, routers):
            state.router_w.copy_(w)
            state.router_b.copy_(b)
    seconds = time.perf_counter() - start
    curves = budget_tables(planned, verdict["kept"])
    loss_after = sparse_loss(sparse_copy(gm, planned), planned, check_tau, batches[0],
                             dense_kept[0], logits_width)
    for ffn, _ in planned:
        ffn.state.set_tau(opts.tau)
    kept = loss_after < loss_before and all(bool(s.router_w.isfinite().all()) for s in states)
    if kept:
        verdict["curves"] = curves
    else:
        with torch.no_grad():
            for state, (w, b, table) in zip(states, fitted):
                state.router_w.copy_(w)
                state.router_b.copy_(b)
                state.tau_table = table
                state.set_tau(opts.tau)
    overflowed = list(finite.values()).count(False)
    skipped = f" ({overflowed} batches with non-finite outputs skipped)" if overflowed else ""
    print(f"ppcompile: router distillation {'kept' if kept else 'dropped'}: {len(losses)} "
          f"updates in {seconds:.1f} s{skipped}, loss {losses[0]:.4g} -> {losses[-1]:.4g}; on the "
          f"check batch {loss_before:.4g} fitted, {loss_after:.4g} distilled", file=sys.stderr)
    gm.meta["ppcompile_distill"] = dict(kept=kept, loss_fitted=loss_before,
                                        loss_distilled=loss_after, seconds=seconds,
                                        losses=losses)


def _straight_through(i, routers, targets, weights, state):
    def sparse_output(x, h):
        w, b = routers[i]
        x2 = x.reshape(-1, x.shape[-1])
        with no_autocast(x2):
            p = F.linear(x2.float(), w, b).softmax(-1)
        with torch.no_grad():
            ranked, order = p.sort(dim=-1, descending=True, stable=True)
            before = torch.empty_like(p).scatter_(-1, order, ranked.cumsum(-1) - ranked)
            k = max(1, min(before.numel(), math.ceil(targets[i] * before.numel())))
            keep = (before <= before.flatten().kthvalue(k).values).float()
        return kept_down(h, keep + p - p.detach(), state.expert_size, weights["w_down"],
                         weights["b_down"])
    sparse_output.__name__ = f"distill_{state.name.replace('.', '_')}"[:60]
    return sparse_output


def _detached(weights: dict) -> dict:
    """The FFN's weights, detached. They are the model's own parameters (graph inputs, which
    fresh_inputs detaches for the graph but not for these closures; not gm's, which _distill
    freezes): attached, the student's down projection computed their gradients on every update
    (SmolLM2: 4.6 s of the distillation's 64 s of backward passes) and left them in the
    model's .grad."""
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}


def _fractions(planned, curves):
    """mean active fraction -> each FFN's share of experts at the model-wide tau that gives it
    (through its layer budget, as set_tau would run it)."""
    widths = [ffn.d_ff for ffn, _ in planned]

    def of(target: float) -> list[float]:
        tau = model_tau_for(curves, widths, target)
        return [float(own[(TAU_GRID - ffn.state.ffn_tau(tau)).abs().argmin()])
                for (ffn, _), (own, _) in zip(planned, curves)]
    return of


def _rms(x) -> float:
    return max(float(x.float().square().mean().sqrt()), 1e-12)
