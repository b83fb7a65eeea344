"""Pass 9: replace each planned FFN by one sparse-FFN node.

Matches: FFNs with a plan (state), and the later uses of their weights (ppcompile_twins), which
share the plan and its inputs. Each one's projections and the nodes between them become one
call of `torch.ops.ppcompile.sparse_ffn` on the FFN's input and its own weight placeholders (in
nn.Linear layout: Conv1D weights are transposed, fused gate_up weights sliced, all as views),
followed by `stats.add_(counts)`. The router weights, tau and statistics enter as new graph
inputs, appended after the existing ones and marked static (their addresses never change), so
the same compiled graph serves any layer whose weights it is called with.
Guarantees: per rewritten FFN the graph loses its projections and activation nodes and gains one
sparse_ffn node (with the getitems of its outputs, the add of its counts into the statistics and
views of the weights it reads); every other node is untouched; gm.meta["ppcompile_inputs"] lists, per rewritten
FFN, the input positions of its up and down weights and its expert size, in the order of the
new inputs (4 per FFN: router_w, router_b, tau, stats).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..kernels import ops  # noqa: F401  (registers torch.ops.ppcompile)

EXTRA_INPUTS = ("router_w", "router_b", "tau", "stats")


def rewrite(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    position = {n: i for i, n in enumerate(placeholders)}
    last = placeholders[-1]
    layout, extras = [], {}
    pairs = gm.meta.get("ppcompile_twins", [])
    first_of = {id(twin): first for twin, first in pairs}
    for ffn in [*gm.meta["ppcompile_ffns"], *(twin for twin, _ in pairs)]:
        first = first_of.get(id(ffn))
        if first is not None:
            ffn.state = first.state
        if ffn.state is None:
            continue
        if id(first or ffn) not in extras:  # a twin uses its first match's inputs
            extra = extras[id(ffn)] = {}
            for name, value in zip(EXTRA_INPUTS, extra_inputs(ffn.state, ctx.options.method)):
                with graph.inserting_after(last):
                    last = extra[name] = graph.placeholder(f"ppcompile_{len(layout)}_{name}")
                last._dynamo_source = None
                last.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
                last.meta["example_value"] = value
        extra = extras[id(first or ffn)]
        with graph.inserting_before(ffn.down.node):
            w = _weight_nodes(graph, ffn)
            result = graph.call_function(torch.ops.ppcompile.sparse_ffn.default, (
                ffn.x, w["w_up"], w["b_up"], w["w_gate"], w["b_gate"], w["w_down"], w["b_down"],
                extra["router_w"], extra["router_b"], extra["tau"], ffn.state.activation,
                ffn.state.expert_size, ctx.options.method))
            out = graph.call_function(operator.getitem, (result, 0))
            counts = graph.call_function(operator.getitem, (result, 1))
            graph.call_method("add_", (extra["stats"], counts))
        ffn.down.node.replace_all_uses_with(out)
        _erase_dead(graph, [*ffn.down.nodes, *ffn.region, *ffn.up.nodes,
                            *(ffn.gate.nodes if ffn.gate else ())])
        if first is not None:
            continue
        layout.append((position[ffn.up.weight], position[ffn.down.weight], ffn.state.expert_size))
    gm.meta["ppcompile_inputs"] = layout
    graph.lint()
    gm.recompile()
    return gm


def extra_inputs(state, method) -> list:
    """The values of one FFN's extra graph inputs, in EXTRA_INPUTS order."""
    return [*state.router_inputs(method), state.tau_input(method), state.stats]


def _weight_nodes(graph, ffn) -> dict:
    """Nodes for the FFN's tensors in nn.Linear layout, as views of the weight placeholders."""

    def view(proj, bias=False, rows=None):
        node = proj.bias if bias else proj.weight
        if node is None:
            return None
        if proj.transposed and not bias:
            node = graph.call_method("t", (node,))
        if rows is not None:
            node = graph.call_function(operator.getitem, (node, rows))
        return node

    if ffn.fused is None:
        gate = ffn.gate
        return dict(w_up=view(ffn.up), b_up=view(ffn.up, bias=True),
                    w_gate=gate and view(gate), b_gate=gate and view(gate, bias=True),
                    w_down=view(ffn.down), b_down=view(ffn.down, bias=True))
    halves = (slice(0, ffn.d_ff), slice(ffn.d_ff, 2 * ffn.d_ff))
    g, u = halves if ffn.fused == "gate_first" else halves[::-1]
    return dict(w_up=view(ffn.up, rows=u), b_up=view(ffn.up, bias=True, rows=u),
                w_gate=view(ffn.up, rows=g), b_gate=view(ffn.up, bias=True, rows=g),
                w_down=view(ffn.down), b_down=view(ffn.down, bias=True))


def _erase_dead(graph, nodes):
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(set(nodes), key=order.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)
