"""The sparse-FFN custom op `torch.ops.ppcompile.sparse_ffn`, with its fake (meta) implementation
and an autograd formula. It runs the torch reference; Inductor calls it as an opaque kernel.

Inputs are the FFN's own weights in nn.Linear layout ([out, in], any strides), the router, tau as a
0-d tensor (so changing tau never recompiles), the expert size and the selection method. It returns the FFN output and
a float64 pair (active neurons summed over tokens, tokens) that the graph adds into its statistics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import check_arguments, ffn_hidden, keep_mask, kept_down, sparse_ffn_reference


@torch.library.custom_op("ppcompile::sparse_ffn", mutates_args=())
def sparse_ffn(x: Tensor, w_up: Tensor, b_up: Optional[Tensor], w_gate: Optional[Tensor],
               b_gate: Optional[Tensor], w_down: Tensor, b_down: Optional[Tensor],
               router_w: Tensor, router_b: Tensor, tau: Tensor, activation: str,
               expert_size: int, method: str) -> tuple[Tensor, Tensor]:
    # in its inputs' dtypes, as the fake says and compiled graphs run it: under a caller's
    # autocast the projections would come out bfloat16 and the router logits select otherwise
    with _no_autocast(x):
        return sparse_ffn_reference(x, w_up, b_up, w_gate, b_gate, w_down, b_down, router_w,
                                    router_b, tau, activation, expert_size, method)


def _no_autocast(x: Tensor):
    return torch.autocast(x.device.type, enabled=False)


@sparse_ffn.register_fake
def _(x, w_up, b_up, w_gate, b_gate, w_down, b_down, router_w, router_b, tau, activation,
      expert_size, method):
    check_arguments(x, w_up, b_up, w_gate, b_gate, w_down, b_down, router_w, router_b,
                    activation, expert_size, method)  # at trace time
    return x.new_empty(*x.shape[:-1], w_down.shape[0]), x.new_empty(2, dtype=torch.float64)


def _setup_context(ctx, inputs, output):
    ctx.activation, ctx.expert_size, ctx.method = inputs[10], inputs[11], inputs[12]
    ctx.save_for_backward(*inputs[:10])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_counts):
    # Gradients flow to x and the FFN weights through the kept experts; routing has none.
    if torch.is_grad_enabled():  # backward(create_graph=True): this backward is not differentiable
        raise NotImplementedError("ppcompile.sparse_ffn: second derivatives (create_graph=True) "
                                  "are not supported; its backward computes first ones only")
    x, w_up, b_up, w_gate, b_gate, w_down, b_down, router_w, router_b, tau = ctx.saved_tensors
    d = x.shape[-1]
    x2d = x.reshape(-1, d)
    with torch.no_grad(), _no_autocast(x):
        h = ffn_hidden(x2d, w_up, b_up, w_gate, b_gate, ctx.activation)
        keep = keep_mask(ctx.method, x2d, h, w_down, router_w, router_b, tau, ctx.expert_size)
    inputs = (x, w_up, b_up, w_gate, b_gate, w_down, b_down)
    wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    leaves = [t.detach().requires_grad_(i in wanted) if t is not None else None
              for i, t in enumerate(inputs)]
    with torch.enable_grad(), _no_autocast(x):
        lx, lw_up, lb_up, lw_gate, lb_gate, lw_down, lb_down = leaves
        h = ffn_hidden(lx.reshape(-1, d), lw_up, lb_up, lw_gate, lb_gate, ctx.activation)
        y = kept_down(h, keep, ctx.expert_size, lw_down, lb_down)
        grads = torch.autograd.grad(y, [leaves[i] for i in wanted], grad_y.reshape(y.shape))
    out = [None] * len(inputs)
    for i, g in zip(wanted, grads):
        out[i] = g
    return (*out, None, None, None, None, None, None)


sparse_ffn.register_autograd(_backward, setup_context=_setup_context)
