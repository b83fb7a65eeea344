"""Pass 10: on the GPU, lower each sparse-FFN node to the Triton kernels.

Matches: `ppcompile.sparse_ffn` nodes whose weights are CUDA tensors, when triton is installed and
the method runs on the kernels (all but "oracle", which must compute the dense FFN). Each becomes
`ppcompile.sparse_ffn_triton` with the same arguments: a `triton_op`, so Inductor traces its
kernel launches into the code it generates (CUDA-graph friendly, no opaque call).
Guarantees: same numbers of sparse-FFN nodes before and after, same arguments, same outputs (to
the kernels' rounding). gm.meta["ppcompile_relayout"] lists (input position, column_major) for
the weights whose memory layout is not the one the kernels stream fastest: rows of up and gate
contiguous, columns of down contiguous (so one expert's down weights are one contiguous run).
The pass cannot change them itself: dynamo guards on parameter strides, so the backend re-lays
them out after a call (relayout_).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..kernels import gpu_op


def lower_to_triton(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    gm.meta["ppcompile_relayout"] = []
    if not gpu_op.AVAILABLE or ctx.options.method == "oracle":
        return gm
    lowered = {ffn.down.weight for ffn in gm.meta["ppcompile_ffns"]
               if ffn.state is not None and ctx.values[ffn.down.weight].is_cuda}
    for node in gm.graph.nodes:
        if node.target is torch.ops.ppcompile.sparse_ffn.default and _down_weight(node) in lowered:
            node.target = torch.ops.ppcompile.sparse_ffn_triton.default
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
