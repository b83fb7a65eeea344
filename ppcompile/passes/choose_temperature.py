"""Pass 7: the routers' softmax temperature, chosen on a calibration batch, per operating point.

Matches: FFNs whose plan train_routers made in this compile (they still hold their calibration
sample).
How peaked a router's softmax is decides how the cumulative-mass rule spreads a mean budget over
tokens: a sharper softmax gives confident tokens fewer experts and the others more, a flatter one
evens them out. The routers are fitted to output shares and distilled at drawn fractions, neither
of which sets that spread for the budgets users run. So for each T of TEMPERATURES every planned
router's logits are divided by T, the layer budget's tables are refitted where it was kept, and
the distillation loss (distill_loss) of the graph's outputs on the check batch is measured at the
model-wide taus whose mean active fraction on the calibration sample is CHECK_FRACTIONS.
- Where one T is best at both fractions, or the layer budget is kept (its tables are fitted for
  one router), the T with the lowest geometric mean stays, folded into the router weights.
- Otherwise each FFN gets a temperature table: T_low (best at the lower fraction) up to the tau
  that gives it there, T_high (best at the higher) from the tau that gives that one, log-linear
  in between; set_tau rewrites the routers in place for its tau (SparseFFN). The table is kept
  only if the mean active fraction on the calibration sample still grows with tau under it;
  otherwise the single T above.
Measured (router_ablation.md, I, check batch held out of the distillation): on Gemma-3-270M
T = 1 is best at 50% active and a sharper softmax (0.75) lowers the check loss at 80% by 10%;
the table built from that improved prunepath at every fraction.
Guarantees: the graph, the model's weights and the graph's inputs are unchanged; only routers,
tau tables and temperature tables change (routers in place, same tensors); the ranking of experts
by logit, hence topk and static, is unchanged (a positive scale); tau = 1.0 still keeps every
expert; the calibration samples of all FFNs and the kept dense outputs are released.
"""
from __future__ import annotations

import math
import sys
import time
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..kernels.reference import select_experts
from .calibrate import calibration_batches
from .train_routers import (CHECK_FRACTIONS, LOGITS_WIDTH, budget_tables, model_tau_for,
                            sparse_copy, sparse_loss)

# each candidate costs two forwards of the check batch; 2.0 won at neither check fraction on
# Gemma-3 or SmolLM2 (router_ablation.md, I)
TEMPERATURES = (0.75, 1.0, 1.5)


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

    # T -> (budget curves, each FFN's tau table) at T, made once (~2 s on SmolLM2); at T = 1 those
    # of the routers as they stand, which the passes before left in place
    made = {1.0: (gm.meta["ppcompile_budget"]["curves"], [s.tau_table for s in states])}

    def apply(t):
        with torch.no_grad():
            for s, (w, b) in zip(states, base):
                s.router_w.copy_(w / t)
                s.router_b.copy_(b / t)
        if t not in made:
            made[t] = budget_tables(planned, budget_kept), [s.tau_table for s in states]
        for s, table in zip(states, made[t][1]):
            s.tau_table = table
        return made[t][0]

    losses, taus = {}, {}
    for t in TEMPERATURES:
        curves = apply(t)
        taus[t] = [model_tau_for(curves, widths, f) for f in CHECK_FRACTIONS]
        losses[t] = [sparse_loss(sparse, planned, tau, batch, dense, logits_width)
                     for tau in taus[t]]

    def best(score):  # ties: leave the routers as they are
        return min(TEMPERATURES, key=lambda t: (score(t), t != 1.0))

    low = best(lambda t: losses[t][0])
    high = best(lambda t: losses[t][-1])
    table = None
    if low != high and not budget_kept and taus[low][0] < taus[high][-1]:
        table = _schedule(taus[low][0], low, taus[high][-1], high)
        if not _fraction_grows(planned, base, table, widths):
            table = None
    single = best(lambda t: sum(math.log(max(v, 1e-30)) for v in losses[t]))
    apply(1.0 if table is not None else single)
    for s in states:
        s.set_temperature_table(None if table is None else table.clone())
        s.set_tau(ctx.options.tau)
    seconds = time.perf_counter() - start
    chosen = (f"{low:g} up to tau {taus[low][0]:.3f}, {high:g} from tau {taus[high][-1]:.3f}"
              if table is not None else f"{single:g}")
    print(f"ppcompile: router temperature {chosen} (chosen in {seconds:.1f} s); loss on the "
          f"check batch at active fractions {', '.join(map(str, CHECK_FRACTIONS))}: "
          + "; ".join(f"T={t:g} " + ", ".join(f"{v:.4g}" for v in found)
                      for t, found in losses.items()), file=sys.stderr)
    gm.meta["ppcompile_temperature"] = dict(
        chosen=None if table is not None else single, table=table, losses=losses, taus=taus,
        seconds=seconds)


def _schedule(tau_low, t_low, tau_high, t_high, steps=8) -> torch.Tensor:
    """[2, steps + 1]: model-wide tau -> temperature, t_low up to tau_low, t_high from tau_high,
    log-linear in between (SparseFFN clamps to the ends)."""
    grid = torch.linspace(tau_low, tau_high, steps + 1, dtype=torch.float64)
    w = (grid - tau_low) / (tau_high - tau_low)
    temps = torch.exp((1 - w) * math.log(t_low) + w * math.log(t_high))
    return torch.stack([grid, temps]).float()


def _fraction_grows(planned, base, table, widths) -> bool:
    """Whether the width-weighted mean active fraction on the calibration samples grows with tau
    across the table's grid when each tau runs at its temperature (users bisect tau for a
    fraction)."""
    grid, temps = table.double().tolist()
    means = []
    for tau, t in zip(grid, temps):
        kept = 0.0
        for (ffn, _), (w, b), width in zip(planned, base, widths):
            logits = F.linear(ffn.sample["x"].float(), w.float() / t, b.float() / t)
            kept += width * float(select_experts(logits, tau).float().mean())
        means.append(kept / sum(widths))
    return all(b >= a for a, b in zip(means, means[1:]))
