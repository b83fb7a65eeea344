"""Pass 2: give FFNs a plan without calibrating, when one exists.

Matches, in order: (1) with options.plan, every FFN of the graph, from that file; (2) FFNs whose
weights already carry a plan made with the same plan options, and on the same calibration data
where it is given (a recompile for new shapes, the same model compiled again, another graph of
the same model); (3) with options.cache, the FFNs
of a graph whose fingerprint has a cached plan.
Guarantees: the graph is unchanged; matched FFNs get `state`, their weights in the plan's neuron
order (permuted in place from the order they are found in: the original, the plan's own for weights
saved after a compile, or any other; so applying a plan twice is a no-op); weights written in place
since they were planned (load_state_dict) are put back in their plan's order, or, if they are other
weights, planned anew (a warning either way), while weights that training moved in place keep
their plan (and order); a plan file that does not fit (an FFN missing,
another shape, kind or expert size, other weights) is refused with an OptionError naming what
differs; gm.meta["ppcompile_fingerprint"] holds the graph's fingerprint when the cache was
consulted.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from .. import plan as plans
from ..ffn import REGISTRY, SparseFFN
from ..graph import is_module_buffer
from ..options import PLAN_FIELD_DEFAULTS, PLAN_FIELDS, OptionError, Options
from .build_experts import permute_neurons_

DEFAULTS = Options()


def attach_plans(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    ffns = gm.meta["ppcompile_ffns"]
    opts = ctx.options
    if opts.plan is not None:
        path = str(opts.plan)
        todo = [f for f in ffns if not _attach_known(f, ctx, plan_file=path)]
        if todo:
            if opts.calibration is not None:
                warnings.warn(f"ppcompile: option 'calibration' is not used: the plan {path!r} "
                              "is applied as it is (leave 'plan' out to calibrate)", stacklevel=2)
            header, tensors = plans.load(path)
            _check_plan_options(header, ctx, path)
            apply_plan(todo, header, tensors, ctx, path, strict=True)
        return gm
    data = plans.data_hash(opts.calibration)
    todo = [f for f in ffns if not _attach_known(f, ctx, plan_file=None, data=data)]
    if todo and opts.cache:
        fingerprint = graph_fingerprint(gm, ctx)
        gm.meta["ppcompile_fingerprint"] = fingerprint
        path = plans.cached_plan(fingerprint, opts.plan_key(), data)
        if path is not None:
            try:
                loaded = plans.load(path)
            except OptionError as e:  # a damaged cache file: plan afresh (and overwrite it)
                reason = str(e).removeprefix("option 'plan': ")
                warnings.warn(f"ppcompile: ignoring an unreadable cached plan: {reason}",
                              stacklevel=2)
            else:
                apply_plan(todo, *loaded, ctx, str(path), strict=False)
    return gm


def _check_plan_options(header, ctx, path):
    """Plan options given beside a plan file must be those it was made with (it fixes them)."""
    given = ctx.options_source
    if isinstance(given, Options):  # no record of what was set: what differs from the default
        given = {k: getattr(given, k) for k in PLAN_FIELDS
                 if getattr(given, k) != getattr(DEFAULTS, k)}
    made = {**PLAN_FIELD_DEFAULTS, **header["options"]}
    for name in PLAN_FIELDS:
        if name in given and name in made and given[name] != made[name]:
            raise OptionError(
                f"option '{name}'={given[name]!r} differs from {made[name]!r}, the value the plan "
                f"{path!r} was made with (a plan fixes {', '.join(PLAN_FIELDS)}): leave "
                f"'{name}' out, or plan anew without option 'plan'")


def _attach_known(ffn, ctx, plan_file, data=None) -> bool:
    state = REGISTRY.get(*ffn.key_params(ctx.values))
    if state is None:
        return False
    if plan_file is not None and state.plan_file != plan_file:
        return False
    if plan_file is None and state.plan_key != ctx.options.plan_key():
        return False
    if plan_file is None and data is not None and state.calibration != data:
        return False  # calibration data given, and the plan was made on other data: plan anew
    if not _in_plan_order(ffn, state, ctx):
        return False
    _adopt(ffn, state, ctx)
    return True


def _in_plan_order(ffn, state, ctx) -> bool:
    """Whether a registered plan still fits its FFN's weights, which are then in its neuron order.
    Weights are found by identity, and load_state_dict writes into the same tensors: the same
    weights in another order are permuted back; other weights lose the plan."""
    weights = ffn.weights(ctx.values)
    columns = plans.neuron_columns(weights)
    order = plans.order_of(columns, state.signature, state.perm)
    if order is not None and torch.equal(order, state.perm):
        return True
    if order is None and plans.trained_in_place(columns, state.signature, state.perm):
        # training through the compiled model (an optimizer holds these weights in the plan's
        # order): re-planning would permute them under it. The plan follows the weights
        state.signature = columns
        return True
    if order is not None:
        permute_neurons_(weights, torch.argsort(order)[state.perm])
        warnings.warn(f"ppcompile: the weights of FFN '{state.name}' were written in place since "
                      "it was planned (load_state_dict?), in another neuron order: permuted back "
                      "to its plan's order", stacklevel=2)
        return True
    REGISTRY.drop(*ffn.key_params(ctx.values))
    warnings.warn(f"ppcompile: the weights of FFN '{state.name}' changed since it was planned "
                  "(load_state_dict?): its plan no longer fits them, planning it again",
                  stacklevel=2)
    return False


def _adopt(ffn, state, ctx):
    w_up = ffn.weights(ctx.values)["w_up"]
    if (state.router_w.device, state.router_w.dtype) != (w_up.device, w_up.dtype):
        state.move_to_(w_up.device, w_up.dtype)
    if id(ctx.options_source) not in state.tau_set_by:
        # a new torch.compile call sets its own tau; a recompile (of this compiled handle or of
        # an earlier one) keeps what set_tau chose
        state.set_tau(ctx.options.tau)
        state.tau_set_by.add(id(ctx.options_source))
    ffn.state = state


def graph_fingerprint(gm, ctx) -> str:
    ffn_params = set()
    signatures = []
    for ffn in gm.meta["ppcompile_ffns"]:
        weights = ffn.weights(ctx.values)
        signatures.append(plans.neuron_signature(weights))
        for node in (ffn.up.weight, ffn.up.bias, ffn.down.weight, ffn.down.bias,
                     *((ffn.gate.weight, ffn.gate.bias) if ffn.gate else ())):
            if node is not None:
                ffn_params.add(node)
    # the other parameters and the buffers (rotary frequencies: another rope_theta feeds the
    # FFNs other inputs)
    others = [v for n, v in ctx.values.items() if n.op in ("placeholder", "get_attr")
              and n not in ffn_params and (isinstance(v, torch.nn.Parameter)
                                           or is_module_buffer(n, v))]
    structure = "\n".join(_operation(n) for n in gm.graph.nodes
                          if n.op in ("call_function", "call_method"))
    return plans.graph_fingerprint(others, signatures, structure)


def _operation(node) -> str:
    """A node's operation and its float and string arguments (a norm's eps, a GELU's
    approximation), not its ints, which hold the traced shapes (a plan serves every length)."""
    constants = [repr(a) for a in tree_leaves((node.args, node.kwargs))
                 if isinstance(a, (float, str))]
    return f"{node.op} {getattr(node.target, '__name__', node.target)} {' '.join(constants)}"


def _entry_name(name: str, entries) -> str | None:
    """The plan entry for FFN `name`: the same name, or the only one that differs from it by a
    leading path only. The names come from how the model was compiled: torch.compile(model)
    calls a Llama FFN 'model.layers.0.mlp' where a function around the model `m` makes it
    'm.model.layers.0.mlp' (the weights' signature check, after this, tells models apart)."""
    if name in entries:
        return name
    same = [k for k in entries if k.endswith("." + name) or name.endswith("." + k)]
    return same[0] if len(same) == 1 else None


def apply_plan(ffns, header, tensors, ctx, path, strict):
    """Give each FFN the plan's entry of the same name, after checking that it fits."""
    calibration = header.get("calibration")  # the hash of the data it was made on, if recorded
    made_on = calibration.get("sha") if isinstance(calibration, dict) else None
    # plans made before FFN names lost the 'args.' of wrapped forwards still match
    entries = {}
    for i, e in enumerate(header["ffns"]):
        entries.setdefault(e["name"].removeprefix("args."), []).append((i, e))
    for ffn in ffns:
        name = _entry_name(ffn.name, entries)
        if name is None:
            if not strict:
                continue
            raise OptionError(
                f"option 'plan': {path!r} has no FFN named '{ffn.name}' (it has "
                f"{', '.join(sorted(entries)) or 'none'}); it was made for another model")
        want = dict(kind=ffn.kind, activation=ffn.activation, d_model=ffn.d_model, d_ff=ffn.d_ff)
        weights = ffn.weights(ctx.values)
        columns = plans.neuron_columns(weights)
        ours = plans.sorted_columns(columns)
        # FFNs of graphs that graph breaks split off may share a name (each one's is relative to
        # its own frame: 'mlp'); their weights tell them apart
        fitting = next(((i, e) for i, e in entries[name]
                        if {k: e[k] for k in want} == want and plans.same_signature(
                            ours, plans.sorted_columns(tensors[f"{i}.signature"]))), None)
        if fitting is None:  # say what differs from the (first) entry of that name
            if not strict:  # a cached plan for another graph: plan this FFN afresh
                continue
            got = {k: entries[name][0][1][k] for k in want}
            if got != want:
                raise OptionError(f"option 'plan': FFN '{ffn.name}' in {path!r} is {got}, "
                                  f"but the model's is {want}")
            raise OptionError(
                f"option 'plan': {path!r} was made for other weights: the weights of FFN "
                f"'{ffn.name}' are not the ones the plan recorded (per-neuron sums differ; a "
                "plan fits only the weights it was made for)")
        i, entry = fitting
        stored = tensors[f"{i}.signature"]
        perm = tensors[f"{i}.perm"]
        if header["format"] in plans.ORDERED:
            order = plans.order_of(columns, stored, perm)
            if order is None:
                if not strict:
                    continue
                raise OptionError(
                    f"option 'plan': the neurons of FFN '{ffn.name}' are in an order that "
                    f"{path!r} cannot pair with its own (same weights, but no neuron order makes "
                    "their per-neuron sums match)")
        else:  # older plans: the weights are in the original order unless we permuted them
            current = REGISTRY.get(*ffn.key_params(ctx.values))
            order = torch.arange(ffn.d_ff) if current is None else current.perm
        permute_neurons_(weights, torch.argsort(order)[perm])
        signature = plans.neuron_columns(weights)
        on_device = dict(device=weights["w_up"].device, dtype=weights["w_up"].dtype)
        opts = header["options"]
        state = SparseFFN(
            name=ffn.name, kind=ffn.kind, activation=ffn.activation, d_model=ffn.d_model,
            d_ff=ffn.d_ff, expert_size=entry["expert_size"],
            router_w=tensors[f"{i}.router_w"].to(**on_device),
            router_b=tensors[f"{i}.router_b"].to(**on_device),
            static_scores=tensors[f"{i}.static_scores"].to(device=on_device["device"]),
            tau=torch.tensor(1.0, dtype=torch.float32, device=on_device["device"]),
            tau_table=tensors.get(f"{i}.tau_table"),
            temperature_table=tensors.get(f"{i}.temperature_table"),
            perm=perm, signature=signature,
            plan_key=tuple({**PLAN_FIELD_DEFAULTS, **opts}[name] for name in PLAN_FIELDS),
            calibration=made_on,
            plan_file=path)
        REGISTRY.put(*ffn.key_params(ctx.values), state)
        _adopt(ffn, state, ctx)
