"""Pass 5: router fine-tuning.

Matches: FFNs with a calibration sample and experts built, but no plan yet. For each sampled token
the target is each expert's share of the FFN output, ||W_down[:, e] h_e(x)||. The linear router
(d -> E) is fitted by ridge regression of the log shares on x, in closed form: softmax(router(x))
is then the predicted distribution of output shares, so "keep experts until their probability
reaches tau" keeps about a tau share of the output. (Measured on SmolLM2-135M: as good as 300
Adam steps of soft cross-entropy, or an MLP router, at about 1% of the time; see
benchmarks/results/router_ablation.md.)
Guarantees: the graph is unchanged; each such FFN gets a SparseFFN state (router and the static
method's expert ranking, in the weights' dtype and device; tau = options.tau; zeroed statistics)
registered under its weights; the calibration sample is released.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ffn import REGISTRY, SparseFFN
from ..kernels.reference import expert_importance
from ..plan import neuron_signature

RIDGE = 1e-2  # ridge penalty, relative to the mean diagonal of x^T x


def train_routers(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    opts = ctx.options
    for ffn in gm.meta["ppcompile_ffns"]:
        if ffn.state is not None or ffn.sample is None:
            continue
        weights = ffn.weights(ctx.values)
        with torch.no_grad():
            share = expert_importance(ffn.sample["h"], weights["w_down"], opts.expert_size)
            share = share / share.sum(-1, keepdim=True).clamp_min(1e-30)
            router_w, router_b = fit_router(ffn.sample["x"], share)
            static = share.mean(0).clamp_min(1e-30).log()
        w_up = weights["w_up"]
        on_device = dict(device=w_up.device, dtype=w_up.dtype)
        state = SparseFFN(
            name=ffn.name, kind=ffn.kind, activation=ffn.activation, d_model=ffn.d_model,
            d_ff=ffn.d_ff, expert_size=opts.expert_size, router_w=router_w.to(**on_device),
            router_b=router_b.to(**on_device), static_scores=static.to(device=w_up.device),
            tau=torch.tensor(opts.tau, dtype=torch.float32, device=w_up.device),
            perm=ffn.perm.cpu(), signature=neuron_signature(weights), plan_key=opts.plan_key(),
            options_source=ctx.options_source)
        REGISTRY.put(*ffn.key_params(ctx.values), state)
        ffn.state, ffn.sample, ffn.planned_now = state, None, True
    return gm


def fit_router(x: torch.Tensor, share: torch.Tensor):
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
