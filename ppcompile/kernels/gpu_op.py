"""`torch.ops.ppcompile.sparse_ffn_triton`: the sparse FFN on the Triton kernels of triton_ffn.

The schema of `ppcompile::sparse_ffn` (ops.py) with the FFN's statistics after tau: it returns
y and adds the counts into stats, the one input it writes (the kernels' atomics add them there
directly; the CPU op returns them for the graph to add, because an op that mutates an input
cannot have the autograd formula the CPU op has). It is a `torch.library.triton_op`, so
Inductor traces its body and emits the kernel launches in its own generated code (no opaque
call, CUDA-graph friendly). No fake implementation is registered: triton_op uses the body itself
as one, which works because the body only allocates with torch.empty, picks its launch plan from
shapes and dtypes, and launches kernels through wrap_triton (no data-dependent Python control
flow; tau is never read on the host).

Importing this module never fails: without triton the op is simply not registered (AVAILABLE).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

try:
    from .triton_ffn import sparse_ffn_triton as _sparse_ffn_triton
except ImportError:  # no triton on this machine
    _sparse_ffn_triton = None

AVAILABLE = _sparse_ffn_triton is not None

if AVAILABLE:

    @torch.library.triton_op("ppcompile::sparse_ffn_triton", mutates_args=("stats",))
    def sparse_ffn_triton(x: Tensor, w_up: Tensor, b_up: Optional[Tensor],
                          w_gate: Optional[Tensor], b_gate: Optional[Tensor], w_down: Tensor,
                          b_down: Optional[Tensor], router_w: Tensor, router_b: Tensor,
                          tau: Tensor, stats: Tensor, activation: str, expert_size: int,
                          method: str) -> Tensor:
        return _sparse_ffn_triton(x, w_up, b_up, w_gate, b_gate, w_down, b_down, router_w,
                                  router_b, tau, activation, expert_size, method, stats)[0]
