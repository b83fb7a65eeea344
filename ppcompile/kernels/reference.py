"""Plain torch reference of the sparse FFN: the semantics every kernel must reproduce.

A sparse FFN is a dense FFN whose d_ff intermediate neurons are grouped into E = d_ff / s
contiguous experts of s neurons, plus a router (linear, d -> E). Per token:

    p    = softmax(router(x))                          # over experts
    keep = the top-ranked experts until their cumulative p reaches tau
           (the expert that crosses tau is kept, so at least one; tau >= 1 keeps all)
    y    = sum over kept experts e of  W_down[:, e] @ h_e(x)  + b_down

where h(x) = act(x W_up^T + b_up) for plain FFNs and act(x W_gate^T + b_gate) * (x W_up^T + b_up)
for gated ones (SwiGLU, GeGLU). Kept experts contribute exactly their dense output, so
tau = 1.0 is the dense FFN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
}


def ffn_hidden(x, w_up, b_up, w_gate, b_gate, activation):
    """The FFN's intermediate activation h [..., d_ff] (before the down projection)."""
    act = ACTIVATIONS[activation]
    up = F.linear(x, w_up, b_up)
    if w_gate is None:
        return act(up)
    return act(F.linear(x, w_gate, b_gate)) * up


def select_experts(logits: torch.Tensor, tau) -> torch.Tensor:
    """Bool mask [N, E] of kept experts: per row, the top-ranked experts until the softmax mass
    of the ones ranked above reaches tau. tau may be a float or a 0-d tensor."""
    p = logits.float().softmax(-1)
    sorted_p, order = p.sort(-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = (mass_before < tau) | (torch.as_tensor(tau) >= 1.0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def router_logits(x2d, router_w, router_b):
    return F.linear(x2d.float(), router_w.float(), router_b.float())


def sparse_ffn_reference(x, w_up, b_up, w_gate, b_gate, w_down, b_down, router_w, router_b,
                         tau, activation: str, expert_size: int):
    """Returns (y [..., d], counts float64 [2] = (active neurons summed over tokens, tokens))."""
    d = x.shape[-1]
    x2d = x.reshape(-1, d)
    keep = select_experts(router_logits(x2d, router_w, router_b), tau)
    h = ffn_hidden(x2d, w_up, b_up, w_gate, b_gate, activation)
    h = h * keep.repeat_interleave(expert_size, dim=1).to(h.dtype)
    y = F.linear(h, w_down, b_down)
    counts = torch.stack([keep.sum().double() * expert_size,
                          torch.tensor(x2d.shape[0], dtype=torch.float64, device=x.device)])
    return y.reshape(*x.shape[:-1], y.shape[-1]), counts
