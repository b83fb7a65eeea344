"""Pass 5: router fine-tuning.

Matches: FFNs with a calibration sample and experts built, but no plan yet. For each sampled token
the target is the share of each expert in the FFN's output: ||W_down[:, e] h_e(x)|| normalised
over experts. A linear router (d -> E) is fitted so that softmax(router(x)) matches that
distribution (cross-entropy with soft targets, Adam), which makes "keep experts until their
probability reaches tau" keep about a tau share of the output.
Guarantees: the graph is unchanged; each such FFN gets a SparseFFN state (router in the weights'
dtype and device, tau = options.tau, zeroed statistics) registered under its weights; the
calibration sample is released.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ffn import REGISTRY, SparseFFN

BATCH = 1024
LR = 1e-2


def train_routers(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    opts = ctx.options
    for ffn in gm.meta["ppcompile_ffns"]:
        if ffn.state is not None or ffn.sample is None:
            continue
        weights = ffn.weights(ctx.values)
        x, h = ffn.sample["x"], ffn.sample["h"]
        with torch.no_grad():
            target = expert_importance(h, weights["w_down"], opts.expert_size)
        router_w, router_b = fit_router(x, target, opts.router_steps, opts.seed)
        w_up = weights["w_up"]
        state = SparseFFN(
            name=ffn.name, kind=ffn.kind, activation=ffn.activation, d_model=ffn.d_model,
            d_ff=ffn.d_ff, expert_size=opts.expert_size,
            router_w=router_w.to(device=w_up.device, dtype=w_up.dtype),
            router_b=router_b.to(device=w_up.device, dtype=w_up.dtype),
            tau=torch.tensor(opts.tau, dtype=torch.float32, device=w_up.device),
            perm=ffn.perm.cpu(), plan_key=opts.plan_key(), options_source=ctx.options_source)
        REGISTRY.put(*ffn.key_params(ctx.values), state)
        ffn.state, ffn.sample = state, None
    return gm


def expert_importance(h: torch.Tensor, w_down: torch.Tensor, size: int) -> torch.Tensor:
    """[n, E]: norm of each expert's contribution W_down[:, e] h_e to the FFN output, per token
    (computed through the experts' s x s Gram matrices, without forming the outputs)."""
    n, d_ff = h.shape
    experts = d_ff // size
    w = w_down.float().reshape(w_down.shape[0], experts, size)
    gram = torch.einsum("des,det->est", w, w)
    hs = h.float().reshape(n, experts, size)
    sq = torch.einsum("nes,est,net->ne", hs, gram, hs)
    return sq.clamp_min(0).sqrt()


def fit_router(x: torch.Tensor, importance: torch.Tensor, steps: int, seed: int):
    """Linear router whose softmax matches importance / importance.sum(); returns (W [E, d], b [E])."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = x.float()
    target = importance / importance.sum(-1, keepdim=True).clamp_min(1e-12)
    weight = torch.zeros(importance.shape[1], x.shape[1], device=x.device, requires_grad=True)
    bias = target.mean(0).clamp_min(1e-9).log().detach().requires_grad_(True)
    opt = torch.optim.Adam([weight, bias], lr=LR)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (min(BATCH, x.shape[0]),), generator=gen).to(x.device)
            logp = torch.log_softmax(x[idx] @ weight.t() + bias, dim=-1)
            loss = -(target[idx] * logp).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return weight.detach(), bias.detach()
