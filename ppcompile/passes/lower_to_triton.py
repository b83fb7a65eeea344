"""Pass 10: on the GPU, lower each sparse-FFN node to the Triton kernels.

Matches: `ppcompile.sparse_ffn` nodes whose weights are CUDA tensors, when triton is installed and
the method runs on the kernels (all but "oracle", which must compute the dense FFN), with the
`stats.add_(counts)` that rewrite puts after each. Each pair becomes one
`ppcompile.sparse_ffn_triton` node on the same arguments plus stats: a `triton_op`, so Inductor
traces its kernel launches into the code it generates (CUDA-graph friendly, no opaque call), and
its kernels add the counts into stats with their own atomics (the separate add was one more
kernel launch per FFN and decode step).
Not lowered: graphs compiled to be differentiated (grad mode on and an input, such as a weight,
that requires grad): the triton_op writes its statistics input in place, so it can have no
autograd formula, and the torch reference op, which has one, stays (with a warning naming the
way to the kernels: run under torch.no_grad() or torch.inference_mode()).
Guarantees: as many sparse-FFN nodes before and after, the same arguments, the same output and
statistics (to the kernels' rounding); the lowered FFNs' add_ nodes are gone.
gm.meta["ppcompile_relayout"] lists (input position, column_major) for the weights whose memory
layout is not the one the kernels stream fastest: rows of up and gate contiguous, columns of down
contiguous (so one expert's down weights are one contiguous run). The pass cannot change them
itself: dynamo guards on parameter strides, so the backend re-lays them out after a call
(relayout_).
"""
from __future__ import annotations

import operator
import warnings

import torch
import torch.fx as fx

from ..kernels import gpu_op


def lower_to_triton(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    gm.meta["ppcompile_relayout"] = []
    if not gpu_op.AVAILABLE or ctx.options.method == "oracle":
        return gm
    lowered = {ffn.down.weight for ffn in gm.meta["ppcompile_ffns"]
               if ffn.state is not None and on_gpu(ctx.values[ffn.down.weight])}
    if lowered and differentiated(ctx.example_inputs):
        warnings.warn(
            "ppcompile: this graph was compiled with gradients on (grad mode, and inputs such as "
            "the weights that require grad), so its sparse FFNs run the torch reference op, "
            "which has a backward, not the Triton kernels; for inference call the model under "
            "torch.no_grad() or torch.inference_mode()", stacklevel=2)
        lowered = set()
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.ppcompile.sparse_ffn.default and _down_weight(node) in lowered:
            _lower(gm.graph, node)
    position = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    for ffn in gm.meta["ppcompile_ffns"]:
        if ffn.down.weight not in lowered:
            continue
        for role, proj in (("up", ffn.up), ("gate", ffn.gate), ("down", ffn.down)):
            if proj is None:
                continue
            column_major = (role == "down") != proj.transposed
            if is_column_major(ctx.values[proj.weight]) != column_major:
                gm.meta["ppcompile_relayout"].append((position[proj.weight], column_major))
    gm.recompile()
    return gm


def differentiated(example_inputs) -> bool:
    """Whether AOT autograd will trace this graph's backward too (dynamo guards on grad mode, so
    the same graph never runs in the other mode)."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def on_gpu(t: torch.Tensor) -> bool:
    """Whether an FFN's weights are lowered (a function, so a CPU test can pretend)."""
    return t.is_cuda


def _lower(graph: fx.Graph, node: fx.Node):
    """sparse_ffn -> (y, counts), stats.add_(counts)  =>  y = sparse_ffn_triton(..., stats, ...)"""
    parts = {user.args[1]: user for user in node.users if user.target is operator.getitem}
    adds = list(parts[1].users) if 1 in parts else []
    if len(parts) != len(node.users) or len(adds) != 1 or adds[0].target != "add_":
        raise RuntimeError(f"lower_to_triton: {node.name} is not followed by one stats.add_ of its "
                           "counts (rewrite's pattern); the graph was changed in between")
    add = adds[0]
    args = list(node.args)
    with graph.inserting_before(node):
        lowered = graph.call_function(torch.ops.ppcompile.sparse_ffn_triton.default,
                                      (*args[:10], add.args[0], *args[10:]))
    if 0 in parts:
        parts[0].replace_all_uses_with(lowered)
    for dead in (add, parts[1], parts.get(0), node):
        if dead is not None:
            graph.erase_node(dead)


def _down_weight(node: fx.Node) -> fx.Node:
    """The placeholder behind the sparse-FFN node's w_down argument (through t() and slices)."""
    w = node.args[5]
    while w.op != "placeholder":
        w = w.args[0]
    return w


def is_column_major(t: torch.Tensor) -> bool:
    return t.stride(0) == 1 and t.shape[0] > 1


def relayout_(param: torch.Tensor, column_major: bool):
    """Give a 2-D parameter the wanted memory layout, in place (same tensor object, same values;
    nothing to do if it has it already). The old storage is freed once the new one is written,
    so the weights are never kept twice."""
    if is_column_major(param) == column_major:
        return
    with torch.no_grad():
        param.data = param.data.t().contiguous().t() if column_major else param.data.contiguous()
