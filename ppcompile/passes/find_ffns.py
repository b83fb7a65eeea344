"""Pass 1: find the FFNs of a dynamo graph by structure, not by module names.

Matches: a projection (F.linear, Conv1D's addmm, x @ W.T + b) whose input is computed only from
the outputs of one or two other projections of a common input x, through nodes that touch no
other tensor (activation, gating, chunking, reshapes). The piece between the projections is then
run on random probes and must equal one of the known FFN forms:
    act(u)                          GELU (erf), tanh GELU (gelu_new, gelu_fast), quick_gelu, ReLU, SiLU
    act(g) * u                      SwiGLU, GeGLU, ReGLU with separate gate and up projections
    act(u[:F]) * u[F:] (or swapped) the same with a fused gate_up projection (Phi-3)
so an activation spelled out as a formula (GPT-2's gelu_new) matches like F.gelu does.

Guarantees: the graph is unchanged; gm.meta["ppcompile_ffns"] lists FFNMatch objects whose
projections and region nodes are used by nothing outside the FFN, no node belongs to two FFNs,
and no two of them share weights: a module applied twice (the same up, gate and down weights) is
listed at its first use, and each later use in gm.meta["ppcompile_twins"] as (match, first
match), to be planned once and rewritten at every use. FFNs that share only some of the tensors a
plan reorders (a tied gate or down projection), or whose weights the graph also reads elsewhere,
are left out, with a warning: reordering one would corrupt the other. FFNs whose input has no
rows in the traced example (a call with an empty batch) are left out too, silently
(gm.meta["ppcompile_tokenless"]): an empty output is the same either way.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx

from ..ffn import FFNMatch
from ..graph import Projection, concrete, match_projection, produces_tensor, run_nodes, source_name
from ..kernels.reference import ACTIVATIONS

MAX_REGION_NODES = 64


def find_ffns(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    values = ctx.values
    projections = {}
    for node in gm.graph.nodes:
        proj = match_projection(node, values)
        if proj is not None:
            projections[proj.node] = proj
    taken, ffns, twins, by_weights = set(), [], [], {}
    for down in projections.values():
        match = _match_ffn(down, projections, values)
        if match is None:
            continue
        nodes = _nodes(match)
        if nodes & taken:
            continue
        taken |= nodes
        key = (match.up.weight, match.gate.weight if match.gate else None, match.down.weight)
        if key in by_weights:
            twins.append((match, by_weights[key]))
        else:
            by_weights[key] = match
            ffns.append(match)
    shared = _partly_shared(ffns, twins, values)
    if shared:
        warnings.warn(
            f"ppcompile: FFNs {', '.join(sorted(m.name for m in shared))} share some of their "
            "weights with another FFN or read them elsewhere in the graph; their neurons cannot be "
            "reordered for one without corrupting the other, so they stay dense", stacklevel=2)
    # a graph traced on no tokens (an empty batch) has nothing to select or calibrate on: its
    # FFNs run dense there, and are planned at the first call that has tokens
    empty = {m for m in ffns if _no_tokens(m)}
    gm.meta["ppcompile_tokenless"] = bool(empty)
    gm.meta["ppcompile_ffns"] = [m for m in ffns if m not in shared | empty]
    gm.meta["ppcompile_twins"] = [(t, m) for t, m in twins if m not in shared | empty]
    return gm


def _no_tokens(match) -> bool:
    example = match.x.meta.get("example_value", match.x.meta.get("val"))
    return isinstance(example, torch.Tensor) and concrete(example.numel()) == 0


def _partly_shared(ffns, twins, values) -> set:
    """The first matches (ffns) whose neuron-ordered tensors (up and gate weights and biases, the
    down weight, which a plan permutes in place) are shared with another FFN that is not their
    twin (same up, gate and down), or whose weight nodes are also read outside every FFN."""
    group_nodes = {id(m): _nodes(m) for m in ffns}
    for twin, first in twins:
        group_nodes[id(first)] |= _nodes(twin)
    inside = set().union(*group_nodes.values())
    owners, shared = {}, set()
    for m in ffns:
        for node in _permuted(m):
            owners.setdefault(_storage(values[node]), set()).add(id(m))
            if any(user not in inside for user in node.users):
                shared.add(id(m))
    for groups in owners.values():
        if len(groups) > 1:
            shared |= groups
    return {m for m in ffns if id(m) in shared}


def _permuted(match):
    projections = [match.up, match.gate] if match.gate else [match.up]
    return [*(p.weight for p in projections), *(p.bias for p in projections if p.bias is not None),
            match.down.weight]


def _nodes(match) -> set:
    return {*match.region, *match.down.nodes, *match.up.nodes,
            *(match.gate.nodes if match.gate else ())}


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without real storage
        return id(t)


def _match_ffn(down: Projection, projections, values) -> FFNMatch | None:
    region, frontier = _region_between(down, projections)
    if not region or not frontier or len(frontier) > 2:
        return None
    if len({p.x for p in frontier}) != 1:
        return None
    inside = set(region) | {down.node, *down.nodes}
    for node in [*region, *(p.node for p in frontier)]:
        if any(user not in inside for user in node.users):
            return None  # an intermediate value is used elsewhere: not a self-contained FFN
    weights = [p.weight_view(values) for p in frontier]
    d_model = weights[0].shape[1]
    d_ff = down.weight_view(values).shape[1]
    if any(w.shape[1] != d_model for w in weights):
        return None
    if [w.shape[0] for w in weights] not in ([d_ff, d_ff], [d_ff], [2 * d_ff]):
        return None
    form = _identify(region, frontier, down, d_ff, values)
    if form is None:
        return None
    activation, shape = form
    up, gate, fused = frontier[0], None, None
    if shape == "gate_first_pair":
        gate, up = frontier
    elif shape == "gate_second_pair":
        up, gate = frontier
    elif shape in ("gate_first", "up_first"):
        fused = shape
    names = [source_name(p.weight) for p in (up, down)]
    return FFNMatch(name=_common_prefix(names), activation=activation, x=up.x, up=up, gate=gate,
                    down=down, region=region, fused=fused, d_model=d_model, d_ff=d_ff)


def _region_between(down: Projection, projections):
    """Walk back from the down projection's input to the projections that feed it. Returns the
    region nodes (graph order) and the feeding projections, or ([], None) if any other tensor
    (a placeholder, a constant tensor, an unknown node) flows in."""
    region, frontier, stack, seen = [], [], [down.x], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in projections:
            frontier.append(projections[node])
            continue
        if node.op not in ("call_function", "call_method") or len(region) >= MAX_REGION_NODES:
            return [], None
        region.append(node)
        for arg in node.all_input_nodes:
            if produces_tensor(arg):
                stack.append(arg)
    order = {n: i for i, n in enumerate(down.node.graph.nodes)}
    region.sort(key=order.__getitem__)
    frontier.sort(key=lambda p: order[p.node])
    return region, frontier


def _identify(region, frontier, down, d_ff, values):
    """Run the region on random probes; return (activation, shape) of the FFN form it equals, or
    None. Probes are float64 so that GELU and its tanh approximation differ; the form found must
    also hold on probes of magnitudes up to LARGE_PROBE, so that a clipped activation (relu6, a
    GELU clipped at 10, a SwiGLU whose gate is clamped at 7) is not taken for the unclipped one
    it equals on small values."""
    gen = torch.Generator().manual_seed(0)
    shapes = []
    for p in frontier:
        example = p.node.meta.get("example_value", p.node.meta.get("val"))
        if not isinstance(example, torch.Tensor):
            return None
        # at least one of each dimension: a graph traced on 0 tokens is probed on 1
        shapes.append(tuple(max(1, n) for n in concrete(tuple(example.shape))))
    moderate = [torch.rand(s, generator=gen, dtype=torch.float64) * 12 - 6 for s in shapes]
    large = [_large_probe(s, gen) for s in shapes]
    form = _identify_on(moderate, region, frontier, down, d_ff, values)
    if form is None or _identify_on(large, region, frontier, down, d_ff, values, form) is None:
        return None
    return form


LARGE_PROBE = 200.0  # gated products stay below float16's 65504 (a region that casts to it)


def _large_probe(shape, gen):
    """Values of both signs whose magnitudes spread log-uniformly over [0.1, LARGE_PROBE]."""
    magnitude = 0.1 * (LARGE_PROBE / 0.1) ** torch.rand(shape, generator=gen, dtype=torch.float64)
    sign = torch.randint(0, 2, shape, generator=gen).double() * 2 - 1
    return magnitude * sign


def _identify_on(probes, region, frontier, down, d_ff, values, only=None):
    """The form (activation, shape) the region equals on these probes (among `only`, if given)."""
    try:
        env = run_nodes(region, {p.node: t for p, t in zip(frontier, probes)}, values)
        out = env[down.x]
    except Exception:  # any op that cannot run on a probe is not part of an FFN we know
        return None
    rows = probes[0].numel() // probes[0].shape[-1]
    if not isinstance(out, torch.Tensor) or out.numel() != rows * d_ff:
        return None
    out = out.reshape(-1, d_ff).double()
    flat = [t.reshape(-1, t.shape[-1]) for t in probes]
    if len(frontier) == 2:
        shapes = ("gate_first_pair", "gate_second_pair")
    elif flat[0].shape[-1] == 2 * d_ff:
        shapes = ("gate_first", "up_first")
    else:
        shapes = ("plain",)
    forms = [only] if only is not None else [(a, s) for a in ACTIVATIONS for s in shapes]
    scale = out.abs().max().clamp_min(1e-12)
    # one form's output at a time (probes are the traced input's size); a non-finite output
    # (overflow in a low-precision cast) matches nothing
    errors = [((out - _form_output(*form, flat, d_ff)).abs().max() / scale)
              .nan_to_num(float("inf")).item() for form in forms]
    best = min(range(len(forms)), key=errors.__getitem__)
    return forms[best] if errors[best] <= _tolerance(region, values) else None


def _form_output(activation, shape, flat, d_ff):
    """What FFN form (activation, shape) computes from the flattened probes."""
    act = ACTIVATIONS[activation]
    if shape == "plain":
        return act(flat[0])
    if shape.endswith("_pair"):
        gate, up = flat if shape == "gate_first_pair" else flat[::-1]
    else:
        lo, hi = flat[0][:, :d_ff], flat[0][:, d_ff:]
        gate, up = (lo, hi) if shape == "gate_first" else (hi, lo)
    return act(gate) * up


def _tolerance(region, values):
    """Relative tolerance of the probe comparison: tight, unless the region itself rounds to a
    low-precision dtype (a model that casts inside its activation)."""
    eps = 1e-6
    for node in region:
        for arg in (*node.args, *node.kwargs.values()):
            if isinstance(arg, torch.dtype) and arg.is_floating_point:
                eps = max(eps, 4 * torch.finfo(arg).eps)
    return eps


def _common_prefix(names):
    parts = [n.split(".") for n in names]
    prefix = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        prefix.append(group[0])
    return ".".join(prefix) or names[0]
