"""Pass 7: the routers' softmax temperature, chosen on a calibration batch.

Matches: FFNs whose plan train_routers made in this compile (they still hold their calibration
sample).
How peaked a router's softmax is decides how the cumulative-mass rule spreads a mean budget over
tokens: a sharper softmax gives confident tokens fewer experts and the others more, a flatter one
evens them out. The routers are fitted to output shares and distilled at drawn fractions, neither
of which sets that spread for the budgets users run. So for each T of TEMPERATURES every planned
router's logits are divided by T (W / T, b / T: the same op and kernels), the layer budget's
tables are refitted where it was kept, and the distillation loss (distill_loss) of the graph's
outputs on the check batch is measured at the model-wide taus whose mean active fraction on the
calibration sample is CHECK_FRACTIONS; the T with the lowest geometric mean of those losses stays.
Measured (router_ablation.md, I): on Gemma-3-270M at 50% active a flatter softmax (T = 1.5)
closed the ~1% by which the mass rule trailed a fixed top-k.
Guarantees: the graph, the model's weights and the graph's inputs are unchanged; only routers and
tau tables change (in place, same tensors); the ranking of experts by logit, hence topk and
static, is unchanged (a positive scale); tau = 1.0 still keeps every expert; the calibration
samples of all FFNs and the kept dense outputs are released.
"""
from __future__ import annotations

import math
import sys
import time
import warnings

import torch
import torch.fx as fx

from .calibrate import calibration_batches
from .train_routers import (CHECK_FRACTIONS, LOGITS_WIDTH, budget_tables, model_tau_for,
                            sparse_copy, sparse_loss)

TEMPERATURES = (0.75, 1.0, 1.5, 2.0)


def choose_temperature(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    ffns = gm.meta["ppcompile_ffns"]
    planned = [(f, f.weights(ctx.values)) for f in ffns if f.planned_now and f.sample is not None]
    try:
        if planned:
            _choose(gm, ctx, planned)
    finally:
        for ffn in ffns:
            ffn.sample = None
        gm.meta.pop("ppcompile_dense", None)
    return gm


def _choose(gm, ctx, planned):
    states = [ffn.state for ffn, _ in planned]
    base = [(s.router_w.clone(), s.router_b.clone()) for s in states]
    budget_kept = gm.meta["ppcompile_budget"]["kept"]
    widths = [ffn.d_ff for ffn, _ in planned]
    logits_width = LOGITS_WIDTH * max(ffn.d_model for ffn, _ in planned)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # calibrate has warned already if data is missing
        batch = calibration_batches(gm, ctx)[0]
    dense = gm.meta["ppcompile_dense"][0]
    sparse = sparse_copy(gm, planned)
    start = time.perf_counter()

    def apply(t):
        with torch.no_grad():
            for s, (w, b) in zip(states, base):
                s.router_w.copy_(w / t)
                s.router_b.copy_(b / t)
        curves = budget_tables(planned)
        if not budget_kept:
            for s in states:
                s.tau_table = None
        return curves

    losses = {}
    for t in TEMPERATURES:
        curves = apply(t)
        losses[t] = [sparse_loss(sparse, planned, model_tau_for(curves, widths, f), batch, dense,
                                 logits_width) for f in CHECK_FRACTIONS]
    score = {t: sum(math.log(max(v, 1e-30)) for v in found) for t, found in losses.items()}
    chosen = min(TEMPERATURES, key=lambda t: (score[t], t != 1.0))  # ties: leave the routers
    apply(chosen)
    for s in states:
        s.set_tau(ctx.options.tau)
    seconds = time.perf_counter() - start
    print(f"ppcompile: router temperature {chosen:g} chosen in {seconds:.1f} s; loss on the "
          f"check batch at active fractions {', '.join(map(str, CHECK_FRACTIONS))}: "
          + "; ".join(f"T={t:g} " + ", ".join(f"{v:.4g}" for v in found)
                      for t, found in losses.items()), file=sys.stderr)
    gm.meta["ppcompile_temperature"] = dict(chosen=chosen, losses=losses, seconds=seconds)
