"""Pass 5: router fine-tuning: a router per FFN, then a layer budget across the FFNs.

Matches: FFNs with a calibration sample and experts built, but no plan yet.
1. Router. For each sampled token the target is each expert's share of the FFN output,
   ||W_down[:, e] h_e(x)|| normalised over experts. The linear router (d -> E) starts from the
   ridge regression of the log shares on x (closed form) and then minimises the cross-entropy
   of softmax(router(x)) to the shares (full-batch L-BFGS, 100 iterations, 30 when
   distill_routers follows): the softmax is then the predicted share distribution itself, so
   "keep experts until their probability reaches tau" keeps about a tau share of the output.
2. Layer budget. A model-wide tau would give every FFN whatever active fraction its router's
   confidence yields, whatever the cost. Instead, for each model-wide tau on a grid, the FFNs of
   this graph share the active fraction that tau gives on average (on the calibration sample),
   split to minimise the summed cost of the dropped experts: per token, their squared output
   norms (cross terms ignored) over the squared norm of the FFN output, times the FFN's weight in
   its residual stream (calibrate's sample["weight"]). Each FFN's threshold at each grid tau is
   stored as its `tau_table`; set_tau interpolates it ("prunepath" only).
3. Budget check. That cost model fits some models and not others, so the budget is kept only if,
   on the first calibration batch at mean active fractions 0.5 and 0.8, it brings the graph's
   outputs closer to the dense outputs than the model-wide tau does (check_budget); otherwise
   every FFN runs at the model-wide tau (tau_table None). A line on stderr says which.
Measured (benchmarks/results/router_ablation.md): on SmolLM2-135M the layer budget is what lets
the cumulative-mass rule beat a fixed top-k, and the cross-entropy step helps it a little; on
Gemma-3-270M and MiniLM-L6 the model-wide tau is better than this budget; a 2-layer MLP router
gained little over a linear one on the same sample.
Guarantees: the graph is unchanged; each such FFN gets a SparseFFN state (router, tau table or
None, and the static method's expert ranking, in the weights' dtype and device; tau =
options.tau; zeroed statistics) registered under its weights; gm.meta["ppcompile_budget"] holds
the check's numbers; tau = 1.0 keeps every expert in every FFN (a table maps 1 to 1); each
FFN's threshold never decreases as tau grows; the calibration sample stays for distill_routers
and choose_temperature (which releases it), its h replaced by what the budget curves read
("importance": the experts' output norms [n, E]; "y2": ||y||^2 [n]). Deterministic.
"""
from __future__ import annotations

import math
import sys
import warnings
from itertools import repeat

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..ffn import REGISTRY, SparseFFN
from ..kernels.reference import expert_importance, keep_mask, kept_down
from ..plan import data_hash, neuron_columns
from .calibrate import (calibration_batches, floating_leaves, floating_outputs, in_place,
                        no_autocast, plan_precision)

RIDGE = 1e-2  # ridge penalty, relative to the mean diagonal of x^T x
CE_STEPS = 100  # L-BFGS iterations of the cross-entropy fit
# the same when distill_routers refines the routers after: as good there, in a third of the time
# (router_ablation.md, G); 10 cost prunepath on Gemma-3 and gave topk the lead on SmolLM2 at 0.9
# (N); none at all is worse (N)
CE_STEPS_DISTILLED = 30
CE_DECAY = 1e-4  # L2 penalty on the router weight in the cross-entropy fit
# model-wide taus at which the layer budget is solved: fine near 1, where fractions move fast;
# none is 0 (the rule would keep no expert)
TAU_GRID = torch.cat([torch.linspace(0.01, 0.9, 90), torch.linspace(0.9, 1.0, 51)[1:]]).double()


def train_routers(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    opts = ctx.options
    planned = []
    for ffn in gm.meta["ppcompile_ffns"]:
        if ffn.state is not None or ffn.sample is None:
            continue
        weights = ffn.weights(ctx.values)
        with torch.no_grad():
            importance = expert_importance(ffn.sample["h"], weights["w_down"], opts.expert_size)
            # what the budget curves read of h, computed once (they are refitted after
            # distillation)
            ffn.sample["importance"] = importance
            ffn.sample["y2"] = F.linear(ffn.sample["h"].float(), weights["w_down"].float()
                                        ).double().square().sum(-1)
            del ffn.sample["h"]
            share = importance / importance.sum(-1, keepdim=True).clamp_min(1e-30)
            router_w, router_b = fit_router(ffn.sample["x"], share, ce_steps(opts))
            static = share.mean(0).clamp_min(1e-30).log()
        w_up = weights["w_up"]
        on_device = dict(device=w_up.device, dtype=w_up.dtype)
        ffn.state = SparseFFN(
            name=ffn.name, kind=ffn.kind, activation=ffn.activation, d_model=ffn.d_model,
            d_ff=ffn.d_ff, expert_size=opts.expert_size, router_w=router_w.to(**on_device),
            router_b=router_b.to(**on_device), static_scores=static.to(device=w_up.device),
            tau=torch.tensor(opts.tau, dtype=torch.float32, device=w_up.device),
            perm=ffn.perm.cpu(), signature=neuron_columns(weights), plan_key=opts.plan_key(),
            calibration=data_hash(opts.calibration), tau_set_by={id(ctx.options_source)})
        planned.append((ffn, weights))
    if not planned:
        return gm
    fit_budget(gm, ctx, planned)
    for ffn, _ in planned:
        REGISTRY.put(*ffn.key_params(ctx.values), ffn.state)
        ffn.planned_now = True
    return gm


def fit_budget(gm: fx.GraphModule, ctx, planned):
    """Layer budget of the planned FFNs [(ffn, weights)] from their calibration samples and
    current routers, checked on a calibration batch (check_budget): sets each state's tau_table
    (None where the check drops the budget) and its tau to options.tau. Stores the check's
    numbers as gm.meta["ppcompile_budget"], with the budget curves under "curves", and for
    distill_routers (which pops it) the distill_loss of the routers and thresholds in place at
    the lower fraction under "loss"; the check batch's dense outputs join
    gm.meta["ppcompile_dense"] (calibrate)."""
    curves = budget_tables(planned)
    with torch.no_grad():
        verdict = check_budget(gm, ctx, planned, curves, [ffn.d_ff for ffn, _ in planned])
    print(f"ppcompile: layer budget {'kept' if verdict['kept'] else 'dropped'}: output error "
          f"on a calibration batch {', '.join(f'{b:.3g}' for b in verdict['budget'])} with it, "
          f"{', '.join(f'{g:.3g}' for g in verdict['model_tau'])} at the model-wide tau "
          f"(active fractions {', '.join(map(str, CHECK_FRACTIONS))})", file=sys.stderr)
    for ffn, _ in planned:
        if not verdict["kept"]:
            ffn.state.tau_table = None
        ffn.state.set_tau(ctx.options.tau)
    verdict["curves"] = curves
    # what distill_routers' own check starts from (it pops it): the loss of the routers and
    # thresholds now in place at the lower fraction
    verdict["loss"] = verdict.pop("losses")["budget" if verdict["kept"] else "model_tau"]
    gm.meta["ppcompile_budget"] = verdict


def budget_tables(planned, budget: bool = True) -> list:
    """Budget curves of the planned FFNs on their samples and current routers, and each state's
    tau_table from them (layer_budgets; None without the budget, so every FFN runs at the
    model-wide tau); returns the curves."""
    with torch.no_grad():
        curves = [budget_curve(ffn.sample, ffn.state.router_w, ffn.state.router_b)
                  for ffn, _ in planned]
        tables = (layer_budgets(curves, [ffn.d_ff for ffn, _ in planned]) if budget
                  else [None] * len(planned))
    for (ffn, _), table in zip(planned, tables):
        ffn.state.tau_table = None if table is None else torch.stack([TAU_GRID, table]).float()
    return curves


def ce_steps(opts) -> int:
    """L-BFGS iterations of the cross-entropy fit: fewer when distill_routers refines the routers
    after it."""
    return CE_STEPS if opts.distill_epochs == 0 else CE_STEPS_DISTILLED


def fit_router(x: torch.Tensor, share: torch.Tensor, steps: int = CE_STEPS):
    """Router (W [E, d], b [E]) for x [n, d] whose softmax matches share [n, E]: the ridge fit of
    the log shares, refined by cross-entropy (`steps` L-BFGS iterations)."""
    weight, bias = fit_log_shares(x, share)
    return refine_cross_entropy(x, share, weight, bias, steps)


def refine_cross_entropy(x, share, weight, bias, steps: int = CE_STEPS):
    """Minimise mean_n -sum_e share log softmax(W x + b) + CE_DECAY ||W||^2 from (W, b), with
    `steps` L-BFGS iterations."""
    # the compile may run under no_grad or inference_mode; plain copies can be differentiated
    with torch.inference_mode(False), torch.enable_grad():
        x, share = x.float().clone(), share.float().clone()
        w = weight.float().clone().requires_grad_(True)
        b = bias.float().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=20,
                                line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            logp = torch.nn.functional.linear(x, w, b).log_softmax(-1)
            value = -(share * logp).sum(-1).mean() + CE_DECAY * w.square().sum()
            value.backward()
            return value

        opt.step(loss)
    return w.detach(), b.detach()


def fit_log_shares(x: torch.Tensor, share: torch.Tensor):
    """Least squares (ridge) fit of log(share) [n, E] from x [n, d]; returns (W [E, d], b [E])."""
    x = x.double()
    target = share.double().clamp_min(1e-6 / share.shape[1]).log()
    mean = x.mean(0)
    xc = x - mean  # centring lets the bias absorb the mean, unpenalised
    gram = xc.t() @ xc
    gram.diagonal().add_(RIDGE * gram.diagonal().mean().clamp_min(1e-12))
    weight = torch.linalg.solve(gram, xc.t() @ (target - target.mean(0)))
    bias = target.mean(0) - mean @ weight
    return weight.t().float(), bias.float()


def budget_curve(sample, router_w, router_b):
    """(fraction [G], cost [G]) of one FFN at each threshold of TAU_GRID, on its calibration
    sample (x, the experts' output norms "importance", ||y||^2 "y2", "weight"), under the
    cumulative-mass rule on its router: the share of experts kept, and the mean over tokens of
    weight * (squared norms of the dropped experts' outputs) / ||y||^2."""
    imp2 = sample["importance"].double().square()
    prob = torch.nn.functional.linear(sample["x"].float(), router_w.float(),
                                      router_b.float()).softmax(-1)
    prob, order = prob.sort(-1, descending=True)  # in float32: half the time of float64's
    prob = prob.double()
    before = prob.cumsum(-1) - prob  # mass ranked above each expert: kept while < tau
    y2 = sample["y2"][:, None]
    scaled = imp2.gather(-1, order) * sample["weight"].double()[:, None] / y2.clamp_min(1e-30)
    kept_cost = torch.cat([torch.zeros_like(scaled[:, :1]), scaled.cumsum(-1)], 1)
    experts = imp2.shape[1]
    grid = TAU_GRID.to(before.device).expand(len(before), -1).contiguous()
    kept = torch.searchsorted(before.contiguous(), grid, side="left")  # [n, G]: before < tau
    kept[:, -1] = experts  # tau = 1 keeps all (the rule's own convention)
    cost = (kept_cost[:, -1:] - kept_cost.gather(-1, kept)).mean(0)
    return kept.double().mean(0).cpu() / experts, cost.cpu()


def layer_budgets(curves, widths) -> list[torch.Tensor]:
    """Per FFN, its threshold [G] at each model-wide tau of TAU_GRID: at grid tau t the FFNs
    keep, width-weighted, the mean fraction that t gives them unchanged, and within that budget
    the Lagrangian split of summed cost (each FFN picks the grid threshold minimising
    cost + lambda * fraction * width; lambda bisected to meet the budget)."""
    fraction = torch.stack([f for f, _ in curves])  # [L, G]
    cost = torch.stack([c for _, c in curves])
    cost = cost / cost.max().clamp_min(1e-30) + 1e-9 * (1 - fraction)  # ties: keep more
    width = torch.tensor(widths, dtype=torch.float64)[:, None]
    width = width / width.mean()
    budget = (fraction * width).mean(0)  # [G]: what each model-wide tau costs unchanged
    rows = torch.arange(len(fraction))
    grid = (TAU_GRID < 1.0).nonzero().flatten()  # tau = 1 keeps everything
    # one bisection for all grid points at once: picks[g, l] is FFN l's grid threshold
    lo = torch.full((len(grid),), -40.0, dtype=torch.float64)
    hi = torch.full((len(grid),), 20.0, dtype=torch.float64)

    def picks_at(log_lambda):  # lambda = exp in float32: the scalar loop's tables to the bit
        price = torch.exp(log_lambda.float()).double()[:, None, None]
        return (cost[None] + price * fraction[None] * width[None]).argmin(2)  # [g, L]

    for _ in range(50):
        mid = (lo + hi) / 2
        picks = picks_at(mid)
        spent = (fraction[rows, picks] * width[:, 0]).mean(1)
        within = spent <= budget[grid]
        lo, hi = torch.where(within, lo, mid), torch.where(within, mid, hi)
    table = torch.ones_like(fraction)
    table[:, grid] = TAU_GRID[picks_at(hi)].T.to(table.dtype)
    return list(torch.cummax(table, 1).values)


CHECK_FRACTIONS = (0.5, 0.8)  # active fractions at which the layer budget must earn its place


def model_tau_for(curves, widths, fraction: float) -> float:
    """The grid tau at which the FFNs, unchanged by any budget, keep on average (width-weighted)
    the active fraction closest to `fraction`: the budget's tables spend that same mean."""
    own = torch.stack([f for f, _ in curves])  # [L, G]
    width = torch.tensor(widths, dtype=torch.float64)[:, None]
    mean = (own * width).sum(0) / width.sum()
    return float(TAU_GRID[(mean - fraction).abs().argmin()])


def check_budget(gm, ctx, planned, curves, widths) -> dict:
    """Run the graph on its first calibration batch dense, then with these FFNs sparse at the
    model-wide taus whose mean active fraction is CHECK_FRACTIONS, each FFN at its budget's
    threshold or at tau itself; keep the budget only if it brings the outputs closer to the
    dense ones (relative L2 error of all floating outputs, geometric mean over the fractions).
    The cost model behind the budget fits some models and not others (measured: it helps
    SmolLM2 a lot, and hurts Gemma-3 and MiniLM), so this measures, on calibration data only.
    Also returns, per kind, the distill_loss at the lower fraction ("losses"): distill_routers'
    baseline, so that it need not run these again. The dense outputs are calibrate's when it kept
    them, else computed here and kept (gm.meta["ppcompile_dense"][0])."""
    taus = [model_tau_for(curves, widths, f) for f in CHECK_FRACTIONS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # calibrate has warned already if data is missing
        batch = calibration_batches(gm, ctx)[0]
    sparse = sparse_copy(gm, planned)
    precision = plan_precision(gm, planned)  # decided once (it scans the graph)
    kept = gm.meta.setdefault("ppcompile_dense", {})
    if 0 not in kept:
        with precision:  # as calibrate computes the outputs it keeps
            kept[0] = floating_outputs(gm(*fresh_inputs(batch)))
    dense = kept[0]
    dense_sq = sum(_sum_sq(w) for w in dense)
    errors = {"budget": [], "model_tau": []}
    losses = {}
    logits_width = LOGITS_WIDTH * max(ffn.d_model for ffn, _ in planned)
    for tau in taus:
        for kind, found in errors.items():
            for ffn, _ in planned:
                ffn.state.tau.fill_(ffn.state.ffn_tau(tau) if kind == "budget" else tau)
            with precision:  # as sparse_loss: outputs in their dtype, inputs copied
                got = floating_leaves(sparse(*fresh_inputs(batch)))
            found.append(_relative_error(got, dense, dense_sq))
            if kind not in losses:  # the lower fraction's only
                losses[kind] = distill_loss(got, dense, logits_width)
    gain = sum(math.log(max(b, 1e-30) / max(g, 1e-30))
               for b, g in zip(errors["budget"], errors["model_tau"]))
    return dict(kept=gain < 0, taus=taus, **errors, losses=losses)


LOGITS_WIDTH = 4  # an output at least this many times wider than d_model is logits


# Temporaries of outputs as large as a model's logits (SmolLM2, 2048 tokens: 400 MB) are made in
# slices of at most this many elements: each fresh large buffer is page-faulted in, which on
# the 2-core machines took 0.6-0.8 s per 400 MB once the process held a few GB (a log_softmax
# of SmolLM2's calibration logits: 0.81 s in the plan passes, 0.12 s in a fresh process), and
# the unsliced loss made ten of them per distillation update. Smaller slices are reused by the
# allocator instead: the KL and its gradient on SmolLM2's logits, with 3 GB held, took 0.38-0.40 s
# in slices of 2^19 elements, 0.41-0.46 s of 2^20, 0.85-0.95 s of 2^21 and 0.73-0.84 s of 2^22
# (2-core EPYC Genoa); 2^18 took 0.66 s (more, smaller operations)
SLICE_ELEMENTS = 1 << 19


def _row_slices(t):
    """t as 2-D rows (last dimension kept), in slices of at most SLICE_ELEMENTS elements."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)  # a loss is 0-d
    step = max(1, SLICE_ELEMENTS // max(1, rows.shape[1]))
    return [rows[i:i + step] for i in range(0, rows.shape[0], step)]


def _sum_sq(a, b=None) -> float:
    """||a - b||^2 (||a||^2 without b), in fp64, a slice at a time."""
    with torch.no_grad():
        pairs = zip(_row_slices(a), _row_slices(b) if b is not None else repeat(None))
        return sum(float((x.float() - y.float() if y is not None else x.float()).square()
                         .sum(dtype=torch.float64)) for x, y in pairs)


def _relative_error(got, want, want_sq=None) -> float:
    """||got - want||^2 / ||want||^2 over all the outputs, a slice at a time (want_sq: ||want||^2
    if known)."""
    num = sum(_sum_sq(g, w) for g, w in zip(got, want))
    if want_sq is None:
        want_sq = sum(_sum_sq(w) for w in want)
    return num / max(want_sq, 1e-30)


def _logits(got, want, logits_width):
    """The first (got, want) pair of logits-like outputs (last dimension >= logits_width)."""
    return next(((g, w) for g, w in zip(got, want) if w.dim() and w.shape[-1] >= logits_width),
                None)


def _kl(got, want, grad=None, scale=1.0) -> float:
    """Mean over tokens of KL(softmax(want) || softmax(got)), a slice of tokens at a time, in
    float32; with grad (got's shape and dtype) scale x its gradient with respect to got is
    written there."""
    total, n = 0.0, got.numel() // got.shape[-1]
    grads = _row_slices(grad) if grad is not None else repeat(None)
    with torch.no_grad():
        for g, w, out in zip(_row_slices(got), _row_slices(want), grads):
            logp_want = w.float().log_softmax(-1)
            logp_got = g.float().log_softmax(-1)
            p_want = logp_want.exp()
            total += float((p_want * (logp_want - logp_got)).sum(dtype=torch.float64))
            if out is not None:
                out.copy_(logp_got.exp_().sub_(p_want).div_(n).mul_(scale))
    return total / n


def _relative_sq_error(got, want):
    """_relative_error as a tensor that autograd follows (encoder outputs: small)."""
    num = sum((g.float() - w.float()).square().sum() for g, w in zip(got, want))
    return num / max(sum(_sum_sq(w) for w in want), 1e-30)


def distill_loss(got, want, logits_width) -> float:
    """The distillation objective of outputs `got` against dense outputs `want`: KL(dense ||
    sparse) on the first logits-like output (last dimension >= logits_width), else the relative
    squared error of all of them."""
    pair = _logits(got, want, logits_width)
    return _kl(*pair) if pair is not None else _relative_error(got, want)


def distill_backward(got, want, logits_width, scale, buffer=None):
    """Backpropagates scale x distill_loss(got, want) through got's graph. Returns the loss and
    the buffer that held the logits' gradient (pass it back next time: reused, not re-faulted)."""
    pair = _logits(got, want, logits_width)
    if pair is None:
        loss = _relative_sq_error(got, want)
        (loss * scale).backward()
        return float(loss.detach()), buffer
    g, w = pair
    if (buffer is None or buffer.shape != g.shape or buffer.dtype != g.dtype
            or buffer.device != g.device):
        buffer = torch.empty_like(g, memory_format=torch.contiguous_format)
    loss = _kl(g.detach(), w, buffer, scale)
    g.backward(buffer)
    return loss, buffer


def sparse_loss(sparse, planned, tau, batch, dense, logits_width) -> float:
    """distill_loss of `sparse` (sparse_copy) on one calibration batch against its dense outputs,
    at model-wide tau (each FFN at its own threshold for it; left there)."""
    for ffn, _ in planned:
        ffn.state.tau.fill_(ffn.state.ffn_tau(tau))
    with torch.no_grad(), plan_precision(sparse, planned):
        return distill_loss(floating_leaves(sparse(*fresh_inputs(batch))), dense, logits_width)


def fresh_inputs(inputs):
    """Parameters detached (no weight gradients), other tensors copied (the graph may write
    into its inputs, and inference-mode tensors cannot be saved for backward)."""
    return [t.detach() if isinstance(t, torch.nn.Parameter)
            else t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]


def sparse_copy(gm: fx.GraphModule, planned) -> fx.GraphModule:
    """A copy of gm in which each planned FFN's output is that of the sparse FFN (reference
    semantics, at its state's router and tau): the down projection of the kept neurons only."""
    return with_ffn_outputs(gm, planned, [_sparsifier(ffn.state, w) for ffn, w in planned])


def with_ffn_outputs(gm: fx.GraphModule, planned, outputs) -> fx.GraphModule:
    """A copy of gm in which planned FFN i's down projection becomes outputs[i](x, h), x being
    the FFN's input and h the down projection's input; the dense down projection is gone (its
    product cost a fifth of SmolLM2's forward pass on top of the sparse one)."""
    graph = fx.Graph()
    env = {}
    graph.output(graph.graph_copy(gm.graph, env))
    for (ffn, _), output in zip(planned, outputs):
        y = env[ffn.down.node]
        with graph.inserting_after(y):
            node = graph.call_function(output, (env[ffn.x], env[ffn.down.x]))
        y.replace_all_uses_with(node)
        _erase_with_unused_inputs(graph, y)
    return fx.GraphModule(gm, graph)


def _erase_with_unused_inputs(graph: fx.Graph, node: fx.Node):
    """Erase node and, recursively, the computations that only fed it. Not the graph's general
    dead-code elimination: FX counts every call_method as pure, and would drop the unused results
    of in-place writes such as a static KV cache's index_copy_."""
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for source in inputs:
        if (not source.users and source.op in ("call_function", "call_method")
                and not in_place(source)):
            _erase_with_unused_inputs(graph, source)


def _sparsifier(state, w):
    def sparse_output(x, h):
        x2, h2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        with no_autocast(x2):
            keep = keep_mask("prunepath", x2.to(state.router_w.dtype), h2, w["w_down"],
                             state.router_w, state.router_b, state.tau, state.expert_size)
        return kept_down(h, keep, state.expert_size, w["w_down"], w["b_down"])
    sparse_output.__name__ = f"sparse_{state.name.replace('.', '_')}"[:60]
    return sparse_output
