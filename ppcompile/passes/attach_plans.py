"""Pass 2: reuse plans that the FFNs' weights already carry.

Matches: FFNs whose (up, down) weights have a SparseFFN state in the registry made with the same
plan options: an earlier torch.compile of the same model, a recompile for new input shapes, or
another graph of the same model. Guarantees: the graph is unchanged; such FFNs get `state` and
are neither calibrated nor permuted again; an FFN whose plan was made with other plan options
is left without state, so it is planned anew (the composed permutation stays exact)."""
from __future__ import annotations

import torch.fx as fx

from ..ffn import REGISTRY


def attach_plans(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    for ffn in gm.meta["ppcompile_ffns"]:
        state = REGISTRY.get(*ffn.key_params(ctx.values))
        if state is None or state.plan_key != ctx.options.plan_key():
            continue
        if state.options_source is not ctx.options_source:
            # a new torch.compile call sets its own tau; a recompile keeps what set_tau chose
            state.set_tau(ctx.options.tau)
            state.options_source = ctx.options_source
        ffn.state = state
    return gm
