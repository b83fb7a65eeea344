"""Reading dynamo's FX graphs: real tensors behind placeholders, projections (linear-like nodes),
concrete values of symbolic sizes, and evaluating a piece of a graph on tensors of our choosing."""
from __future__ import annotations

import operator
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx


def graph_tensors(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, object]:
    """Map each placeholder to its example input and each get_attr node to the module attribute."""
    values = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        values[node] = value
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            values[node] = obj
    return values


def concrete(value):
    """Real value of an example: SymInts become their hint, containers are converted elementwise."""
    if isinstance(value, torch.SymInt):
        return int(value.node.hint)
    if isinstance(value, (list, tuple)):
        return type(value)(concrete(v) for v in value)
    return value


def source_name(node: fx.Node) -> str:
    """Dotted name of a parameter or input ('model.layers.0.mlp.up_proj.weight'), from dynamo's
    source of the placeholder; falls back to the node's target."""
    grapharg = node.meta.get("grapharg")
    if grapharg is not None and getattr(grapharg, "source", None) is not None:
        parts = re.findall(r"\['([^']*)'\]", grapharg.source.name)
        if parts and parts[0] in ("self", "args"):  # the module (args[0] where forward is wrapped)
            parts = parts[1:]
        if parts:
            return ".".join(parts)
    return str(node.target)


def is_user_input(node: fx.Node, value) -> bool:
    """A tensor placeholder that is not a parameter or buffer of the module (dynamo marks those
    static)."""
    if node.op != "placeholder" or not isinstance(value, torch.Tensor):
        return False
    if isinstance(value, torch.nn.Parameter):
        return False
    return not node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")


def is_module_buffer(node: fx.Node, value) -> bool:
    """A tensor the module holds that is not a parameter: a registered buffer (rotary
    frequencies, a causal mask), as a dynamo placeholder or an FX get_attr."""
    if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter):
        return False
    if node.op == "get_attr":
        return True
    source = getattr(node.meta.get("grapharg"), "source", None)
    return node.op == "placeholder" and "._buffers[" in str(getattr(source, "name", ""))


def produces_tensor(node: fx.Node) -> bool:
    value = node.meta.get("example_value", node.meta.get("val"))
    if value is None:
        return True  # unknown: treat as a tensor, the conservative choice
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor)


@dataclass(eq=False)
class Projection:
    """A linear-like node: y = x W^T + b. `node` outputs y (bias included); `nodes` are all graph
    nodes that make it (e.g. matmul, the weight transpose, the bias add). `transposed` is True when
    the parameter is stored [in, out] (GPT-2's Conv1D, x @ W)."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    transposed: bool
    nodes: tuple

    def weight_view(self, values) -> torch.Tensor:
        w = values[self.weight]
        return w.t() if self.transposed else w

    def bias_tensor(self, values):
        return None if self.bias is None else values[self.bias]


_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}
_MATMUL = {operator.matmul, torch.matmul}


def _is_matrix(node, values):
    t = values.get(node) if isinstance(node, fx.Node) else None
    return isinstance(t, torch.Tensor) and t.dim() == 2


def _is_vector(node, values, size):
    t = values.get(node) if isinstance(node, fx.Node) else None
    return isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == size


def _transposed_param(node, values):
    """If `node` is W.T / W.t() / torch.t(W) / W.transpose(0, 1) of a 2-D parameter, return W."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        src = node.args[0]
    elif node.op == "call_method" and node.target == "t" or (
            node.op == "call_function" and node.target is torch.t):
        src = node.args[0]
    elif node.op == "call_method" and node.target == "transpose" and \
            sorted(a % 2 for a in node.args[1:]) == [0, 1]:
        src = node.args[0]
    else:
        return None
    return src if _is_matrix(src, values) else None


def _arg(node, index, name, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def match_projection(node: fx.Node, values) -> Projection | None:
    """Recognise F.linear(x, W, b), torch.addmm(b, x, W) (Conv1D) and x @ W.T (+ b)."""
    if node.op == "call_function" and node.target in _LINEAR:
        x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if _is_matrix(w, values) and (b is None or _is_vector(b, values, values[w].shape[0])):
            return Projection(node, x, w, b, False, (node,))
        return None
    if node.op == "call_function" and node.target is torch.addmm and not node.kwargs:
        b, x, w = node.args[:3]
        if len(node.args) == 3 and _is_matrix(w, values) and _is_vector(b, values, values[w].shape[1]):
            return Projection(node, x, w, b, True, (node,))
        return None
    is_matmul = (node.op == "call_function" and node.target in _MATMUL) or (
        node.op == "call_method" and node.target == "matmul")
    if not is_matmul or len(node.args) != 2:
        return None
    x, rhs = node.args
    w = _transposed_param(rhs, values)
    if w is not None:
        proj = Projection(node, x, w, None, False, (rhs, node))
    elif _is_matrix(rhs, values) and rhs.op in ("placeholder", "get_attr"):
        proj = Projection(node, x, rhs, None, True, (node,))
    else:
        return None
    # absorb a following bias add (Falcon's `x @ W.T + b`)
    if len(node.users) == 1:
        (user,) = node.users
        out_features = proj.weight_view(values).shape[0]
        if user.op == "call_function" and user.target in (operator.add, torch.add) and \
                len(user.args) == 2 and not user.kwargs and user.args[0] is node and \
                _is_vector(user.args[1], values, out_features):
            proj = Projection(user, x, proj.weight, user.args[1], proj.transposed, (*proj.nodes, user))
    return proj


def run_nodes(nodes, env: dict, values) -> dict:
    """Evaluate `nodes` (in graph order) with `env` giving tensors for some nodes; any other input
    node takes its concrete example value. Returns env extended with the nodes' results."""
    env = dict(env)

    def lookup(n):
        if n in env:
            return env[n]
        if n in values:
            return values[n]
        return concrete(n.meta.get("example_value", n.meta.get("val")))

    for node in nodes:
        args = fx.node.map_arg(node.args, lookup)
        kwargs = fx.node.map_arg(node.kwargs, lookup)
        if node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"cannot evaluate {node.op} node {node.name}")
    return env


# dropout functions dynamo records, with the position and name of their training flag
_DROPOUT_FLAGS = {
    **{f: (2, "training") for f in (torch.nn.functional.dropout, torch.nn.functional.dropout1d,
                                    torch.nn.functional.dropout2d, torch.nn.functional.dropout3d,
                                    torch.nn.functional.alpha_dropout,
                                    torch.nn.functional.feature_alpha_dropout)},
    **{f: (2, "train") for f in (torch.dropout, torch.alpha_dropout, torch.feature_dropout,
                                 torch.feature_alpha_dropout)},
}


@contextmanager
def dropout_off(gm: fx.GraphModule):
    """Inside, gm runs with every dropout (attention's too) off, as the model would in eval(): a
    model compiled in train() mode is planned on what it computes for inference, not on dropout
    noise (which would also make its plan depend on the global RNG). Restored on exit."""
    saved = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _DROPOUT_FLAGS:
            position, name, off = *_DROPOUT_FLAGS[node.target], False
        elif node.target is torch.nn.functional.scaled_dot_product_attention:
            position, name, off = 4, "dropout_p", 0.0
        else:
            continue
        saved.append((node, node.args, node.kwargs))
        args, kwargs = list(node.args), dict(node.kwargs)
        if len(args) > position:
            args[position] = off
        else:
            kwargs[name] = off
        node.args, node.kwargs = tuple(args), kwargs
    if saved:
        gm.recompile()
    try:
        yield gm
    finally:
        for node, args, kwargs in saved:
            node.args, node.kwargs = args, kwargs
        if saved:
            gm.recompile()
