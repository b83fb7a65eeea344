"""Plain torch reference of the sparse FFN: the semantics every kernel must reproduce.

A sparse FFN is a dense FFN whose d_ff intermediate neurons are grouped into E = d_ff / s
contiguous experts of s neurons, plus a router (linear, d -> E). Per token:

    p    = softmax(router(x))                          # over experts
    keep = the top-ranked experts until their cumulative p reaches tau
           (the expert that crosses tau is kept, so at least one for tau > 0; tau >= 1 keeps
           all; tau <= 0 none)
    y    = sum over kept experts e of  W_down[:, e] @ h_e(x)  + b_down

where h(x) = act(x W_up^T + b_up) for plain FFNs and act(x W_gate^T + b_gate) * (x W_up^T + b_up)
for gated ones (SwiGLU, GeGLU). Kept experts contribute exactly their dense output, so
tau = 1.0 is the dense FFN.

Research methods choose experts differently at the same cost accounting (`method`):
    "prunepath"  the rule above (default)
    "topk"       a fixed number of experts per token, the router's top round(tau * E)
    "static"     the same round(tau * E) experts for every token (static expert pruning; the
                 caller passes a zero router weight and per-expert scores as the bias)
    "oracle"     the rule above on the experts' true output shares (computes the dense FFN)
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
    of the ones ranked above reaches tau. tau may be a float or a 0-d tensor. Equal
    probabilities rank lowest index first (a stable sort: CUDA's default sort orders ties
    otherwise), as the kernels do."""
    p = logits.float().softmax(-1)
    sorted_p, order = p.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = (mass_before < tau) | (torch.as_tensor(tau) >= 1.0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def select_top_fraction(logits: torch.Tensor, fraction) -> torch.Tensor:
    """Bool mask [N, E] keeping each row's round(fraction * E) highest logits (at least one;
    ties lowest index first). The count is computed on the tensor's device (fp64, half to even
    as Python's round): a 0-d tau tensor is never read on the host, so the op traces and
    captures in CUDA graphs. tau is a float32 (as compiled models hold it, and the kernels read
    it), whatever it was given as: where tau * E is a half, the float32 nearest tau decides
    (0.35 is 0.34999999, so 0.35 of 10 experts keeps 3). NaN keeps none."""
    experts = logits.shape[-1]
    fraction = torch.as_tensor(fraction, device=logits.device).float().double()
    k = (fraction * experts).round().clamp(1, experts)
    # a stable sort, not topk: equal logits go lowest index first on every device
    order = logits.float().sort(dim=-1, descending=True, stable=True).indices
    positions = torch.arange(experts, device=logits.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return rank < k


def router_logits(x2d, router_w, router_b):
    return F.linear(x2d.float(), router_w.float(), router_b.float())


def expert_importance(h: torch.Tensor, w_down: torch.Tensor, size: int) -> torch.Tensor:
    """[N, E]: norm of each expert's contribution W_down[:, e] h_e to the FFN output, per token
    (through the experts' s x s Gram matrices, without forming the [N, E, d] outputs)."""
    n, d_ff = h.shape
    experts = d_ff // size
    w = w_down.float().reshape(w_down.shape[0], experts, size)
    gram = torch.einsum("des,det->est", w, w)
    hs = h.float().reshape(n, experts, size)
    return torch.einsum("nes,est,net->ne", hs, gram, hs).clamp_min(0).sqrt()


METHODS = ("prunepath", "topk", "static", "oracle")


def check_arguments(x, w_up, b_up, w_gate, b_gate, w_down, b_down, router_w, router_b,
                    activation, expert_size, method):
    """Refuse op arguments that cannot describe a sparse FFN, naming the value and what is
    allowed (shapes and names only: nothing is read from the tensors). The kernels index the
    weights by these shapes, so a mismatch the reference's F.linear would refuse must not reach
    them (they would read other rows, or past a tensor's end)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    d_ff, experts = int(w_up.shape[0]), int(router_w.shape[0])
    if expert_size < 1 or d_ff % expert_size:
        raise ValueError(f"expert_size={expert_size} must be >= 1 and divide d_ff={d_ff} "
                         "(the rows of w_up)")
    if experts * expert_size != d_ff:
        raise ValueError(f"router_w has {experts} rows (experts), but d_ff={d_ff} / "
                         f"expert_size={expert_size} makes {d_ff // expert_size} experts")
    d, d_out = int(x.shape[-1]), int(w_down.shape[0])
    wanted = {"w_up": (w_up, (d_ff, d)), "w_gate": (w_gate, (d_ff, d)),
              "w_down": (w_down, (d_out, d_ff)), "router_w": (router_w, (experts, d)),
              "b_up": (b_up, (d_ff,)), "b_gate": (b_gate, (d_ff,)), "b_down": (b_down, (d_out,)),
              "router_b": (router_b, (experts,))}
    for name, (t, shape) in wanted.items():
        if t is not None and tuple(int(n) for n in t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; x's last dimension {d}, "
                             f"w_up's {d_ff} rows, w_down's {d_out} rows and {experts} experts "
                             f"make it {shape}")
    if b_gate is not None and w_gate is None:
        raise ValueError("b_gate is given without w_gate: a plain FFN has no gate projection")


def keep_mask(method, x2d, h, w_down, router_w, router_b, tau, expert_size):
    if method == "oracle":
        share = expert_importance(h, w_down, expert_size)
        return select_experts(share.clamp_min(1e-30).log(), tau)
    logits = router_logits(x2d, router_w, router_b)
    if method == "prunepath":
        return select_experts(logits, tau)
    if method in ("topk", "static"):
        return select_top_fraction(logits, tau)
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


def kept_down(h, keep, expert_size, w_down, b_down):
    """The down projection of h [..., d_ff] counting only the neurons of the experts in keep
    [n, E] (bool, or float: a straight-through mask passes its gradient)."""
    h2d = h.reshape(-1, h.shape[-1])
    kept = h2d * keep.repeat_interleave(expert_size, dim=1).to(h2d.dtype)
    return F.linear(kept, w_down, b_down).reshape(*h.shape[:-1], w_down.shape[0])


def sparse_ffn_reference(x, w_up, b_up, w_gate, b_gate, w_down, b_down, router_w, router_b,
                         tau, activation: str, expert_size: int, method: str = "prunepath"):
    """Returns (y [..., d], counts float64 [2] = (active neurons summed over tokens, tokens))."""
    check_arguments(x, w_up, b_up, w_gate, b_gate, w_down, b_down, router_w, router_b,
                    activation, expert_size, method)
    d = x.shape[-1]
    x2d = x.reshape(-1, d)
    h = ffn_hidden(x2d, w_up, b_up, w_gate, b_gate, activation)
    keep = keep_mask(method, x2d, h, w_down, router_w, router_b, tau, expert_size)
    y = kept_down(h, keep, expert_size, w_down, b_down)
    # new_full, not torch.tensor: no host-to-device copy (the op runs inside CUDA graphs)
    counts = torch.stack([keep.sum().double() * expert_size,
                          keep.new_full((), x2d.shape[0], dtype=torch.float64)])
    return y.reshape(*x.shape[:-1], y.shape[-1]), counts
