"""Pass 4: cluster each FFN's neurons into equal-size experts and store every expert contiguously.

Matches: FFNs with a calibration sample and no plan. Neurons that fire together on calibration
data (cosine similarity of their |activation| over the sampled tokens) go into one expert, by
balanced k-means: every expert gets exactly `expert_size` neurons. The weights are then permuted
in place so that expert e owns neurons [e*s, (e+1)*s): rows of the up/gate projections (and their
biases) and columns of the down projection.
Guarantees: the graph is unchanged and so is the dense function (the same permutation on both
sides of the activation); `ffn.perm` records the neuron order w.r.t. the original weights;
the sample's activations are permuted alike. (An expert size that does not divide d_ff was
refused by calibrate, through refuse_indivisible, before the sample was taken.)
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ffn import REGISTRY
from ..options import OptionError

CLUSTER_TOKENS = 2048
KMEANS_STEPS = 15


def build_experts(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    size = ctx.options.expert_size
    for ffn in gm.meta["ppcompile_ffns"]:
        if ffn.state is not None or ffn.sample is None:
            continue
        gen = torch.Generator(device="cpu").manual_seed(ctx.options.seed)
        assign = balanced_kmeans(_features(ffn.sample["h"]), ffn.d_ff // size, size, gen)
        perm = torch.argsort(assign * ffn.d_ff + torch.arange(ffn.d_ff, device=assign.device))
        permute_neurons_(ffn.weights(ctx.values), perm)
        ffn.sample["h"] = ffn.sample["h"][:, perm]
        previous = REGISTRY.get(*ffn.key_params(ctx.values))  # a plan made with other options
        base = previous.perm.to(perm.device) if previous is not None else None
        ffn.perm = perm if base is None else base[perm]
    return gm


def _features(h: torch.Tensor) -> torch.Tensor:
    """One row per neuron: its |activation| over (at most CLUSTER_TOKENS) sampled tokens, unit
    norm. These are the sample's first rows, which come from the first calibration windows (it is
    in text order): rows spread over the whole sample measured no better (router_ablation.md, W)."""
    z = h[:CLUSTER_TOKENS].abs().t().float()
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


def balanced_kmeans(z: torch.Tensor, clusters: int, size: int, gen) -> torch.Tensor:
    """Cluster the rows of z (unit vectors) into `clusters` groups of exactly `size` rows,
    maximising cosine similarity to the group centroid. Returns the group of each row."""
    n = z.shape[0]
    assert n == clusters * size
    seeds = torch.randperm(n, generator=gen)[:clusters].to(z.device)
    centroids = z[seeds]
    assign = None
    for _ in range(KMEANS_STEPS):
        new = balanced_assign(z @ centroids.t(), size)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centroids = torch.zeros_like(centroids).index_add_(0, assign, z)
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return assign


def balanced_assign(score: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row to a column, at most `capacity` rows per column, greedily by score: in each
    round every unassigned row bids for its best open column and each column takes its best
    bidders up to the room it has left."""
    rows, cols = score.shape
    assign = torch.full((rows,), -1, dtype=torch.long, device=score.device)
    room = torch.full((cols,), capacity, dtype=torch.long, device=score.device)
    while True:
        open_rows = (assign < 0).nonzero().squeeze(1)
        if open_rows.numel() == 0:
            return assign
        bids = score[open_rows].masked_fill(room[None, :] == 0, float("-inf"))
        best_score, best_col = bids.max(dim=1)
        order = torch.argsort(best_score, descending=True, stable=True)
        order = order[torch.argsort(best_col[order], stable=True)]  # by column, best bid first
        col = best_col[order]
        first = torch.searchsorted(col, col, right=False)
        rank = torch.arange(len(order), device=score.device) - first
        won = rank < room[col]
        assign[open_rows[order[won]]] = col[won]
        room -= torch.bincount(col[won], minlength=cols)


def refuse_indivisible(ffns, size: int):
    """OptionError for the first FFN whose width `size` does not divide (calibrate calls this
    before it runs anything)."""
    for ffn in ffns:
        if ffn.d_ff % size:
            divisors = [k for k in range(1, ffn.d_ff + 1) if ffn.d_ff % k == 0]
            near = sorted(divisors, key=lambda k: abs(k - size))[:4]
            examples = ", ".join(map(str, sorted(near)))
            raise OptionError(
                f"option 'expert_size'={size} does not divide d_ff={ffn.d_ff} of FFN "
                f"'{ffn.name}'; use a divisor of {ffn.d_ff}, e.g. {examples}")


def permute_neurons_(weights: dict, perm: torch.Tensor):
    """Reorder an FFN's intermediate neurons in place: rows of up/gate (and biases), columns of
    down. The identity (weights already in that order) copies nothing."""
    if torch.equal(perm.cpu(), torch.arange(len(perm))):
        return
    with torch.no_grad():
        for key in ("w_up", "b_up", "w_gate", "b_gate"):
            t = weights[key]
            if t is not None:
                t.copy_(t[perm.to(t.device)])
        w = weights["w_down"]
        w.copy_(w[:, perm.to(w.device)])
