"""Triton kernels of the sparse FFN, and their launcher `sparse_ffn_triton`.

Same semantics and signature as `reference.sparse_ffn_reference` (read it first). Design notes and
the numbers behind the choices are in benchmarks/KERNELS.md; in short:

* Everything the experts do happens in "compact neuron space": per tile of tokens, the experts
  kept by at least one token of the tile (the tile's *union*), in ascending order (or in the order
  the selection kernel listed them, `Plan.up_list`), give positions q = rank * s + j (j < s) to
  their neurons. Work is split over q, so every program gets the same
  number of active neurons whatever tau selects, and no work is launched for dropped experts.
* Which experts a tile keeps travels as `bits` [tiles, E] int64: bit t of bits[m, e] says that
  token t of tile m keeps expert e (so a tile has at most 64 tokens).
* Kernels (launch order):
    1. _router_kernel: router logits (fp32) into a workspace (not at tau >= 1, which keeps every
       expert), as router_split partial sums over slices of d that the selection adds up; it also
       zeroes every workspace the later kernels accumulate into, so no memset launch is needed.
    2. selection: per token softmax + top-p selection (or, for the "topk"/"static" methods,
       the round(tau * E) highest logits), OR-ed into bits. _select_sorted_kernel sorts a token's
       experts in one program (3+ tokens); _select_pairwise_kernel spreads a token over many
       programs, each deciding a few experts by comparing them with all others (1-2 tokens,
       more than 512 experts); with fewer experts every up program sorts by itself
       (FUSED_SELECT), which saves the launch.
    3. _up_kernel: persistent programs over compact neurons: h = act(x W_gate^T) * (x W_up^T),
       zeroed for tokens that dropped the expert, either stored to a small H [N, d_ff] buffer
       (only active columns are written) or, for one or two tokens (FUSE_DOWN), multiplied by
       W_down at once and reduced into y with fp32 atomics; the last program to finish adds the
       bias and casts y.
       Launch-bound FFNs (one or two tokens, experts of one tile) take _expert_kernel instead: a
       program per expert, which selects for its own expert, then loads its rows once if kept.
    4. _down_kernel: y = H @ W_down^T over the union's neurons only, split over (token tile,
       output columns, KS slices of the neurons); with KS > 1 the slices meet in an fp32
       workspace through atomics and the last slice of each tile writes y.
  Decode (N <= 16) therefore takes 2 launches (N <= 2 and d_out small enough) to 4; prefill 4.
* Block sizes, grids and warps come from `plan()`, a small shape table (no autotuning: the op
  must be capturable in CUDA graphs, and tau, read only on the device, never changes a grid).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from .reference import check_arguments, sparse_ffn_reference

ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3, "silu": 4}
TOPK_METHODS = ("topk", "static")  # both keep the round(tau * E) highest logits
SELECTIONS = ("fused", "sorted", "pairwise")  # where the experts are chosen (Plan.select)

DECODE_MAX_N = 16       # up to this many tokens, the decode plan (one token tile)
# Past this many tokens the op runs the torch reference (cuBLAS GEMMs, dropped experts masked):
# the union of experts is then nearly all of them, and on an H100 (2026-11-25, 4096x14336 bf16)
# cuBLAS took 139 / 144 / 179 / 491 us at 16 / 64 / 256 / 1024 tokens against 224 / 226 / 624 /
# 1482 us for the best kernel plan (benchmarks/results/gpu/run1/kernels_prefill.json).
DENSE_ABOVE = 16
LIST_ABOVE = 1024       # more (padded) experts than this: the pairwise selection lists the kept
MAX_EXPERTS = 8192      # one program sorts a token's experts in registers; above this, reference
MAX_TILE_TOKENS = 64    # bits are int64
MAX_OFFSET = 2 ** 31    # kernels index with int32: tokens x widths, and weights, stay below


def wrap_triton(kernel):
    """torch.library.wrap_triton, except that kernels run by the Triton interpreter
    (TRITON_INTERPRET=1) pass through unwrapped (older torch refuses them).

    The name matters: torch.library.triton_op finds the kernels an op launches by scanning its
    source for calls of `wrap_triton(<kernel>)`."""
    if isinstance(kernel, JITFunction):
        return torch.library.wrap_triton(kernel)
    return kernel


def _empty(shape, dtype, device):
    """Every buffer of the launcher comes from here (tests poison them to catch unwritten reads)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:
        y = tl.maximum(x, 0.0)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 2:
        # tanh from exp(-2|z|): no overflow, and tl has no portable tanh
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = tl.exp(-2.0 * tl.abs(z))
        th = (1.0 - t) / (1.0 + t)
        y = 0.5 * x * (1.0 + tl.where(z < 0, -th, th))
    elif ACT == 3:
        y = x * tl.sigmoid(1.702 * x)
    else:
        y = x * tl.sigmoid(x)
    return y


@triton.jit
def _mac(a, w, acc, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ w^T in fp32, for activations a [M, K] and weight rows w [R, K]."""
    if USE_DOT:
        if IEEE:
            acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)
    elif a.shape[0] == 1:
        # one token: stay 2-D, in the weight tile's own (load) layout
        acc += tl.sum(a.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
    else:
        acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _mac_nn(h, w, acc, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """acc + h @ w in fp32, for h [M, R] and weight rows w [R, C]."""
    if USE_DOT:
        if IEEE:
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w.to(h.dtype), acc)
    elif h.shape[0] == 1:
        acc += tl.sum(tl.trans(h.to(tl.float32)) * w.to(tl.float32), axis=0)[None, :]
    else:
        acc += tl.sum(h.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _zero(ptr, n, lin, nprog, ZBLOCK: tl.constexpr):
    """Program `lin` of `nprog` zeroes its grid-stride share of ptr[0:n]."""
    offs = tl.arange(0, ZBLOCK)
    for start in range(lin * ZBLOCK, n, nprog * ZBLOCK):
        tl.store(ptr + start + offs, tl.zeros([ZBLOCK], ptr.dtype.element_ty),
                 mask=start + offs < n)


@triton.jit
def _select(logits, valid, row_ok, tau, n_exp, TOPK: tl.constexpr):
    """Kept mask of logits [BLOCK_N, E_PAD] (valid: real token and expert; row_ok: real token).

    Default: reference.select_experts: softmax, sort descending, keep rank r iff the mass of the
    ranks above it is < tau (or tau >= 1). TOPK: reference.select_top_fraction: the
    round(tau * E) highest logits, at least one. Either way one fp32 sort gives the kept count,
    the cut becomes a threshold value, and experts tied with it are taken lowest index first.
    Takes values, not pointers: Inductor's mutation analysis counts every pointer that reaches a
    store address through a call as written (tau, a graph input, would be cloned per call).
    tau >= 1 keeps every expert under either rule, and skips the sort (a runtime branch: the sort
    is the largest fixed cost of a one-token call, GPU_RUNS.md runs 11-12)."""
    if tau >= 1.0:
        keep = valid
    else:
        keep = _select_below_one(logits, valid, row_ok, tau, n_exp, TOPK)
    return keep


@triton.jit
def _topk_count(tau, n_exp):
    """The topk/static rules' kept count: Python's round(tau * E) (half to even, exact in fp64:
    24-bit tau times E < 2^31), at least 1 and at most E; 0 for a NaN tau (the reference's
    comparison with NaN keeps none)."""
    v = tau.to(tl.float64) * n_exp
    whole = v.to(tl.int64)
    frac = v - whole.to(tl.float64)
    k = whole + ((frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1))).to(tl.int64)
    return tl.where(tau == tau, tl.minimum(tl.maximum(k, 1), n_exp), 0)  # NaN keeps none


@triton.jit
def _select_below_one(logits, valid, row_ok, tau, n_exp, TOPK: tl.constexpr):
    """_select for tau < 1: one fp32 sort gives the kept count and the cut value."""
    if TOPK:
        score = tl.where(valid, logits, float("-inf"))
        ranked = tl.sort(score, dim=1, descending=True)
        k = _topk_count(tau, n_exp)
        kept_ranked = (tl.arange(0, logits.shape[1])[None, :] < k) & row_ok[:, None]
    else:
        top = tl.where(row_ok, tl.max(logits, axis=1), 0.0)
        ex = tl.exp(logits - top[:, None])
        z = tl.sum(ex, axis=1)
        score = tl.where(valid, ex / tl.where(z > 0, z, 1.0)[:, None], -1.0)
        ranked = tl.sort(score, dim=1, descending=True)  # padding (-1) sorts last
        mass_before = tl.cumsum(ranked, axis=1) - ranked
        kept_ranked = (mass_before < tau) & (ranked >= 0.0)
    n_kept = tl.sum(kept_ranked.to(tl.int32), axis=1)
    threshold = tl.min(tl.where(kept_ranked, ranked, float("inf")), axis=1)
    above = valid & (score > threshold[:, None])
    tie = valid & (score == threshold[:, None])
    ties_needed = n_kept - tl.sum(above.to(tl.int32), axis=1)
    tie_order = tl.cumsum(tie.to(tl.int32), axis=1)
    return above | (tie & (tie_order <= ties_needed[:, None]))


@triton.jit
def _outranks(s_j, s_i, j, i):
    """Whether expert j ranks above expert i: a higher score, or the same score and a lower index
    (the reference's stable descending sort)."""
    return ((s_j > s_i) | ((s_j == s_i) & (j < i))) & (j != i)


@triton.jit
def _token_bits(keep, tok, BLOCK_N: tl.constexpr):
    """bits [E_PAD] int64 of a kept mask [BLOCK_N, E_PAD]: bit t = token tok[t] keeps e."""
    one = tl.full([BLOCK_N, 1], 1, tl.int64)
    return tl.sum(tl.where(keep, one << tok[:, None].to(tl.int64), 0), axis=0)


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _router_kernel(
    x_ptr, stride_xn, stride_xk, rw_ptr, stride_re, stride_rk, rb_ptr,
    logits_ptr, tau_ptr, counts_ptr,
    z64_ptr, n_z64, zf32_ptr, n_zf32, zi32_ptr, n_zi32,
    N, D, E,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr, SPLIT: tl.constexpr, ZBLOCK: tl.constexpr,
):
    # SPLIT > 1: program (block of experts, r) sums its K_STEPS steps of D starting at step
    # r * K_STEPS into logits[r]; the readers add the SPLIT partial logits up
    pe = tl.program_id(0) // SPLIT
    r = tl.program_id(0) % SPLIT
    pn = tl.program_id(1)
    lin = pn * tl.num_programs(0) + tl.program_id(0)
    nprog = tl.num_programs(0) * tl.num_programs(1)
    # workspaces that later kernels accumulate into start at zero (no memset launch)
    _zero(z64_ptr, n_z64, lin, nprog, ZBLOCK)
    _zero(zf32_ptr, n_zf32, lin, nprog, ZBLOCK)
    _zero(zi32_ptr, n_zi32, lin, nprog, ZBLOCK)
    if lin == 0:  # the tokens (the kept neurons are added where they are chosen)
        tl.atomic_add(counts_ptr + 1, tl.zeros([], tl.float64) + N, sem="relaxed")
    # tau >= 1 keeps every expert without looking at the logits (_select): skip the router's
    # bytes (4096x14336 at 100% active: the gap to cuBLAS, GPU_RUNS.md run 18). Inline, not a
    # helper: pointers passed through a call may count as written for Inductor (see _select).
    # Not "tau < 1": a NaN tau must reach the selection, which keeps no expert for it
    if ~(tl.load(tau_ptr) >= 1.0):
        rows = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        es = pe * BLOCK_E + tl.arange(0, BLOCK_E)
        e_ok = es < E
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
        for ks in range(K_STEPS):  # a constant trip count: one step unrolls, no loop
            k = (r * K_STEPS + ks) * BLOCK_K + kk
            k_ok = k < D
            xk = tl.load(x_ptr + rows[:, None] * stride_xn + k[None, :] * stride_xk,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wk = tl.load(rw_ptr + es[:, None] * stride_re + k[None, :] * stride_rk,
                         mask=e_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _mac(xk, wk, acc, USE_DOT, IEEE)
        if r == 0:
            acc += tl.load(rb_ptr + es, mask=e_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(logits_ptr + (r * N + rows[:, None]) * E + es[None, :], acc,
                 mask=row_ok[:, None] & e_ok[None, :])


@triton.jit
def _append_first(old, bits, count_ptr, list_ptr, m, E, experts):
    """Experts that this program made kept in tile m for the first time (old: bits before the
    OR) go to the end of the tile's list: one atomic per program reserves their slots."""
    first = (bits != 0) & (old == 0)
    n_first = tl.sum(first.to(tl.int32), axis=0)
    base = tl.atomic_add(count_ptr + m, n_first.to(tl.int64), sem="relaxed").to(tl.int32)
    slot = base + tl.cumsum(first.to(tl.int32), axis=0) - 1
    tl.store(list_ptr + m * E + slot, experts, mask=first)


@triton.jit
def _select_sorted_kernel(logits_ptr, tau_ptr, bits_ptr, counts_ptr, list_ptr, LIST_COUNTS,
                          N, E, S,
                          TOPK: tl.constexpr, TILE_M: tl.constexpr, SEL_N: tl.constexpr,
                          E_PAD: tl.constexpr, SPLIT: tl.constexpr, LIST: tl.constexpr):
    # SEL_N tokens per program, each sorting its E experts (_select); SEL_N divides TILE_M: all
    # tokens of a program belong to one tile
    row0 = tl.program_id(0) * SEL_N
    rows = row0 + tl.arange(0, SEL_N)
    cols = tl.arange(0, E_PAD)
    valid = (rows[:, None] < N) & (cols[None, :] < E)
    logits = tl.zeros([SEL_N, E_PAD], tl.float32)
    for r in tl.static_range(SPLIT):  # the router's partial sums over slices of D
        logits += tl.load(logits_ptr + (r * N + rows[:, None]) * E + cols[None, :], mask=valid,
                          other=0.0)
    logits = tl.where(valid, logits, float("-inf"))
    keep = _select(logits, valid, rows < N, tl.load(tau_ptr), E, TOPK)
    bits = _token_bits(keep, rows % TILE_M, SEL_N)
    old = tl.atomic_or(bits_ptr + (row0 // TILE_M) * E + cols, bits,
                       mask=(cols < E) & (bits != 0), sem="relaxed")
    if LIST:
        _append_first(old, bits, bits_ptr + LIST_COUNTS, list_ptr, row0 // TILE_M, E, cols)
    n_kept = tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0)
    tl.atomic_add(counts_ptr, n_kept.to(tl.float64) * S, sem="relaxed")


@triton.jit
def _select_pairwise_kernel(logits_ptr, tau_ptr, bits_ptr, counts_ptr, list_ptr, LIST_COUNTS,
                            N, E, S,
                            TOPK: tl.constexpr, TILE_M: tl.constexpr, SEL_E: tl.constexpr,
                            E_PAD: tl.constexpr, SPLIT: tl.constexpr, LIST: tl.constexpr):
    """Program (token n, block b) decides experts [b * SEL_E, (b + 1) * SEL_E) of token n without
    sorting: expert i is kept iff the weight of the experts ranked above it is below the cut,
    "above" meaning a higher score, or the same score and a lower index (the reference's stable
    descending sort). prunepath: score = weight = softmax p, cut = tau (so "weight above" is the
    reference's mass_before); topk/static: score = logit, weight = 1, cut = round(tau * E).
    Every block is independent, so a token's selection spreads over E / SEL_E programs instead of
    one program's E-wide sort (a sort's latency was the largest fixed cost: GPU_RUNS.md)."""
    n = tl.program_id(0)
    mine = tl.program_id(1) * SEL_E + tl.arange(0, SEL_E)
    mine_ok = mine < E
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    tau = tl.load(tau_ptr)
    if tau >= 1.0:  # every expert, under either rule
        keep = mine_ok
    else:
        logits = tl.zeros([E_PAD], tl.float32)
        own = tl.zeros([SEL_E], tl.float32)
        for r in tl.static_range(SPLIT):  # the router's partial sums over slices of d
            row = logits_ptr + (r * N + n) * E
            logits += tl.load(row + cols, mask=col_ok, other=0.0)
            own += tl.load(row + mine, mask=mine_ok, other=0.0)
        if TOPK:
            score = tl.where(col_ok, logits, float("-inf"))
            own_score = own
            weight = col_ok.to(tl.float32)
            cut = _topk_count(tau, E).to(tl.float32)
        else:
            top = tl.max(tl.where(col_ok, logits, float("-inf")), axis=0)
            ex = tl.where(col_ok, tl.exp(logits - top), 0.0)
            z = tl.sum(ex, axis=0)
            z = tl.where(z > 0, z, 1.0)
            score = ex / z
            own_score = tl.exp(own - top) / z  # the same operations as score: the same values
            weight = score
            cut = tau
        above = _outranks(score[None, :], own_score[:, None], cols[None, :], mine[:, None])
        weight_above = tl.sum(tl.where(above & col_ok[None, :], weight[None, :], 0.0), axis=1)
        keep = mine_ok & (weight_above < cut)
    bit = tl.where(keep, tl.full([SEL_E], 1, tl.int64) << (n % TILE_M).to(tl.int64), 0)
    old = tl.atomic_or(bits_ptr + (n // TILE_M) * E + mine, bit, mask=keep, sem="relaxed")
    if LIST:
        _append_first(old, bit, bits_ptr + LIST_COUNTS, list_ptr, n // TILE_M, E, mine)
    n_kept = tl.sum(keep.to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr, n_kept.to(tl.float64) * S, sem="relaxed")


@triton.jit
def _stage_listed(list_ptr, bits_ptr, scr_e_ptr, scr_b_ptr, row, m, E, j, ok):
    """Copies entries j (where ok) of tile m's list of kept experts, and their token bits, to
    scr_e / scr_b at row + j."""
    e_j = tl.load(list_ptr + m * E + j, mask=ok, other=0)
    tl.store(scr_e_ptr + row + j, e_j, mask=ok)
    tl.store(scr_b_ptr + row + j, tl.load(bits_ptr + m * E + e_j, mask=ok, other=0), mask=ok)


@triton.jit
def _up_step(q0, q_end, scr, sparse, y_acc, x_ptr, stride_xn, stride_xk,
             wu_ptr, stride_uf, stride_uk, bu_ptr, wg_ptr, stride_gf, stride_gk, bg_ptr,
             wd_ptr, stride_do, stride_df, h_ptr, scr_e_ptr, scr_b_ptr,
             rows, row_ok, tok, kk, oo, D, DO, F, S,
             ACT: tl.constexpr, GATED: tl.constexpr, HAS_BU: tl.constexpr, HAS_BG: tl.constexpr,
             FUSE_DOWN: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
             BLOCK_N: tl.constexpr, SUB: tl.constexpr, BLOCK_K: tl.constexpr,
             K_STEPS: tl.constexpr):
    """One step of _up_kernel: compact neurons [q0, q0 + SUB) below q_end, whose expert ids and
    token bits were staged at scr + rank; returns y_acc plus their down projection (FUSE_DOWN)
    or stores their h."""
    q = q0 + tl.arange(0, SUB)
    q_ok = q < q_end
    staged_q = tl.where(sparse, q_ok, False)
    e = tl.load(scr_e_ptr + scr + q // S, mask=staged_q, other=0, cache_modifier=".cg")
    ebits = tl.load(scr_b_ptr + scr + q // S, mask=staged_q, other=-1, cache_modifier=".cg")
    nrn = tl.where(sparse, e * S + q % S, q)
    if FUSE_DOWN:
        wd = tl.load(wd_ptr + oo[None, :] * stride_do + nrn[:, None] * stride_df,
                     mask=q_ok[:, None] & (oo < DO)[None, :], other=0.0)
    acc_u = tl.zeros([BLOCK_N, SUB], tl.float32)
    acc_g = tl.zeros([BLOCK_N, SUB], tl.float32)
    for ks in range(K_STEPS):
        k = ks * BLOCK_K + kk
        k_ok = k < D
        xk = tl.load(x_ptr + rows[:, None] * stride_xn + k[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = q_ok[:, None] & k_ok[None, :]
        wu = tl.load(wu_ptr + nrn[:, None] * stride_uf + k[None, :] * stride_uk, mask=w_ok,
                     other=0.0)
        if GATED:
            wg = tl.load(wg_ptr + nrn[:, None] * stride_gf + k[None, :] * stride_gk,
                         mask=w_ok, other=0.0)
            acc_g = _mac(xk, wg, acc_g, USE_DOT, IEEE)
        acc_u = _mac(xk, wu, acc_u, USE_DOT, IEEE)
    if HAS_BU:
        acc_u += tl.load(bu_ptr + nrn, mask=q_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if HAS_BG:
            acc_g += tl.load(bg_ptr + nrn, mask=q_ok, other=0.0).to(tl.float32)[None, :]
        h = _act(acc_g, ACT) * acc_u
    else:
        h = _act(acc_u, ACT)
    kept = ((ebits[None, :] >> tok[:, None].to(tl.int64)) & 1) != 0
    h = tl.where(kept & q_ok[None, :] & row_ok[:, None], h, 0.0)
    if FUSE_DOWN:
        y_acc = _mac_nn(h, wd, y_acc, False, IEEE)
    else:
        tl.store(h_ptr + rows[:, None] * F + nrn[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & q_ok[None, :])
    return y_acc


@triton.jit
def _up_kernel(
    x_ptr, stride_xn, stride_xk,
    wu_ptr, stride_uf, stride_uk, bu_ptr,
    wg_ptr, stride_gf, stride_gk, bg_ptr,
    wd_ptr, stride_do, stride_df, bd_ptr,
    logits_ptr, tau_ptr, bits_ptr, counts_ptr, list_ptr, LIST_COUNTS,
    h_ptr, acc_ptr, counter_ptr, WORK, y_ptr, scr_e_ptr, scr_b_ptr,
    N, D, DO, F, E, S,
    ACT: tl.constexpr, GATED: tl.constexpr,
    HAS_BU: tl.constexpr, HAS_BG: tl.constexpr, HAS_BD: tl.constexpr,
    TOPK: tl.constexpr, FUSED_SELECT: tl.constexpr, LISTED: tl.constexpr, FUSE_DOWN: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, SUB: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
    DO_PAD: tl.constexpr, E_PAD: tl.constexpr, MAXE: tl.constexpr, MAXE_PAD: tl.constexpr,
    UNIT: tl.constexpr, POOL: tl.constexpr,
    R_SPLIT: tl.constexpr,
):
    # K_STEPS = cdiv(D, BLOCK_K) as a constant: with one step the K loop disappears and all of a
    # block's weight loads (gate, up and, fused, down) are issued together
    m = tl.program_id(0)          # token tile
    p = tl.program_id(1)          # slice of the tile's compact neurons
    P = tl.num_programs(1)
    tok = tl.arange(0, BLOCK_N)
    rows = m * BLOCK_N + tok
    row_ok = rows < N
    eidx = tl.arange(0, E_PAD)
    # tau < 1: the work is the union's compact neurons, found through bits and scratch rows.
    # tau >= 1 keeps every expert for every token, so compact neuron q is neuron q: the loads of
    # bits and expert ids (a dependent L2 round trip before each step's weight loads) are
    # skipped (masked off)
    tau = tl.load(tau_ptr)
    sparse = ~(tau >= 1.0)  # NaN is sparse (and keeps nothing), as in the selection

    if FUSED_SELECT:
        # one tile of at most a few tokens: every program selects by itself (identical results)
        # instead of waiting for a selection kernel
        valid = row_ok[:, None] & (eidx[None, :] < E)
        logits = tl.zeros([BLOCK_N, E_PAD], tl.float32)
        for r in tl.static_range(R_SPLIT):
            logits += tl.load(logits_ptr + (r * N + rows[:, None]) * E + eidx[None, :],
                              mask=valid, other=0.0)
        logits = tl.where(valid, logits, float("-inf"))
        keep = _select(logits, valid, row_ok, tau, E, TOPK)
        bits = _token_bits(keep, tok, BLOCK_N)
        if p == 0:
            tl.store(bits_ptr + eidx, bits, mask=eidx < E)
            n_kept = tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0)
            tl.atomic_add(counts_ptr, n_kept.to(tl.float64) * S, sem="relaxed")
    elif not LISTED:
        # (masks through tl.where: the interpreter cannot AND a mask with a loaded scalar)
        bits = tl.load(bits_ptr + m * E + eidx, mask=tl.where(sparse, eidx < E, False), other=0)
        bits = tl.where(sparse, bits, tl.where(eidx < E, -1, 0))  # -1: every token of the tile

    # this program's compact neurons [q_start, q_end), balanced to UNIT neurons
    if LISTED:
        # the selection kernel listed the tile's kept experts: their count is all it takes
        n_active = tl.where(sparse, tl.load(bits_ptr + LIST_COUNTS + m).to(tl.int32), E) * S
    else:
        active = bits != 0
        n_active = tl.sum(active.to(tl.int32), axis=0) * S
    if POOL > 0:
        # all but 1 / POOL of the tile's steps are split evenly; the rest are claimed one step
        # at a time (a counter per tile) by whichever program is done first: the memory system
        # serves programs unevenly, so equal shares end unevenly (GPU_RUNS.md, run 87)
        n_steps = tl.cdiv(n_active, SUB)
        per = (n_steps - n_steps // POOL) // P
        q_start = p * per * SUB
        q_end = tl.minimum((p + 1) * per * SUB, n_active)
        pool_q0 = P * per * SUB
    else:
        n_units = tl.cdiv(n_active, UNIT)
        q_start = (p * n_units // P) * UNIT
        q_end = tl.minimum(((p + 1) * n_units // P) * UNIT, n_active)
    # stage ids and token bits of the experts it touches in its scratch row, then a barrier:
    # the loop reads them from there (its loads stay independent of each other; reading the
    # list and bits in the loop made the one-token stream slower, GPU_RUNS.md run 92)
    r0 = q_start // S
    scr = (m * P + p) * MAXE - r0
    if LISTED:
        # the few list entries this program touches
        j = r0 + tl.arange(0, MAXE_PAD)
        _stage_listed(list_ptr, bits_ptr, scr_e_ptr, scr_b_ptr, scr, m, E, j,
                      tl.where(sparse, (j < r0 + MAXE) & (j * S < n_active), False))
    else:
        # a scatter by rank instead of a reduction over all experts per neuron block
        rank = tl.cumsum(active.to(tl.int32), axis=0) - 1
        staged = tl.where(sparse, active & (rank >= r0) & (rank < r0 + MAXE), False)
        tl.store(scr_e_ptr + scr + rank, eidx, mask=staged)
        tl.store(scr_b_ptr + scr + rank, bits, mask=staged)
    if POOL > 0:
        # every program writes the pool's ids and bits to the tile's pool row: the same values,
        # so a program's own writes (before its barrier) are what it reads, whoever else wrote
        pool_r0 = pool_q0 // S
        pool = tl.num_programs(0) * P * MAXE + m * E - pool_r0
        if LISTED:
            jp = pool_r0 + eidx
            _stage_listed(list_ptr, bits_ptr, scr_e_ptr, scr_b_ptr, pool, m, E, jp,
                          tl.where(sparse, (jp < E) & (jp * S < n_active), False))
        else:
            pooled = tl.where(sparse, active & (rank >= pool_r0), False)
            tl.store(scr_e_ptr + pool + rank, eidx, mask=pooled)
            tl.store(scr_b_ptr + pool + rank, bits, mask=pooled)
    tl.debug_barrier()

    kk = tl.arange(0, BLOCK_K)
    oo = tl.arange(0, DO_PAD)
    if FUSE_DOWN:
        y_acc = tl.zeros([BLOCK_N, DO_PAD], tl.float32)
    else:
        y_acc = tl.zeros([1, 1], tl.float32)  # unused: h goes to memory
    for q0 in range(q_start, q_end, SUB):
        y_acc = _up_step(q0, q_end, scr, sparse, y_acc, x_ptr, stride_xn, stride_xk,
                         wu_ptr, stride_uf, stride_uk, bu_ptr, wg_ptr, stride_gf, stride_gk, bg_ptr,
                         wd_ptr, stride_do, stride_df, h_ptr, scr_e_ptr, scr_b_ptr,
                         rows, row_ok, tok, kk, oo, D, DO, F, S,
                         ACT, GATED, HAS_BU, HAS_BG, FUSE_DOWN, USE_DOT, IEEE,
                         BLOCK_N, SUB, BLOCK_K, K_STEPS)
    worked = q_end > q_start
    if POOL > 0:
        q0 = pool_q0 + tl.atomic_add(counter_ptr + WORK + m, 1, sem="relaxed") * SUB
        while q0 < n_active:
            worked = True
            y_acc = _up_step(q0, n_active, pool, sparse, y_acc, x_ptr, stride_xn, stride_xk,
                             wu_ptr, stride_uf, stride_uk, bu_ptr, wg_ptr, stride_gf, stride_gk,
                             bg_ptr, wd_ptr, stride_do, stride_df, h_ptr, scr_e_ptr, scr_b_ptr,
                             rows, row_ok, tok, kk, oo, D, DO, F, S,
                             ACT, GATED, HAS_BU, HAS_BG, FUSE_DOWN, USE_DOT, IEEE,
                             BLOCK_N, SUB, BLOCK_K, K_STEPS)
            q0 = pool_q0 + tl.atomic_add(counter_ptr + WORK + m, 1, sem="relaxed") * SUB

    if FUSE_DOWN:
        out = rows[:, None] * DO + oo[None, :]
        out_ok = row_ok[:, None] & (oo < DO)[None, :]
        if worked:
            tl.atomic_add(acc_ptr + out, y_acc, mask=out_ok, sem="relaxed")
        # last program in: all partial sums are in acc (bar.sync, then a gpu-scope acq_rel
        # ticket, as CUTLASS's semaphores do); acc is read from L2 (.cg), never from a stale L1
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr + m, 1, sem="acq_rel")
        if ticket == P - 1:
            total = tl.load(acc_ptr + out, mask=out_ok, other=0.0, cache_modifier=".cg")
            if HAS_BD:
                total += tl.load(bd_ptr + oo, mask=oo < DO, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + out, total.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _expert_kernel(
    x_ptr, stride_xn, stride_xk,
    wu_ptr, stride_uf, stride_uk, bu_ptr,
    wg_ptr, stride_gf, stride_gk, bg_ptr,
    wd_ptr, stride_do, stride_df, bd_ptr,
    logits_ptr, tau_ptr, bits_ptr, counts_ptr, acc_ptr, counter_ptr, y_ptr,
    N, D, DO, E, S,
    ACT: tl.constexpr, GATED: tl.constexpr,
    HAS_BU: tl.constexpr, HAS_BG: tl.constexpr, HAS_BD: tl.constexpr,
    TOPK: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, S_PAD: tl.constexpr,
    D_PAD: tl.constexpr, DO_PAD: tl.constexpr, E_PAD: tl.constexpr, R_SPLIT: tl.constexpr,
):
    """Tiny FFNs, one or two tokens (Plan.up_by_expert): program e is expert e. It decides whether
    its tokens keep it (the pairwise test of _select_pairwise_kernel, for this one expert: no
    sort); if one does, it loads the expert's gate, up and down rows (one tile each) and adds its
    share of y into acc; the last program to arrive writes y. Launch-bound shapes pay for a chain
    of latencies; this has one selection and one weight round trip per program, where the up
    kernel sorts, stages the kept experts and walks its slice in steps."""
    e = tl.program_id(0)
    tok = tl.arange(0, BLOCK_N)
    row_ok = tok < N
    j = tl.arange(0, S_PAD)
    nrn = e * S + j
    n_ok = j < S
    kk = tl.arange(0, D_PAD)
    k_ok = kk < D
    oo = tl.arange(0, DO_PAD)
    o_ok = oo < DO
    w_ok = n_ok[:, None] & k_ok[None, :]

    # which tokens keep expert e (tau >= 1: all; the logits are then not even written)
    cols = tl.arange(0, E_PAD)
    col_ok = cols < E
    # the logits are loaded beside tau, not after it: one round trip less (at tau >= 1 they
    # are not written, and not used)
    valid = row_ok[:, None] & col_ok[None, :]
    logits = tl.zeros([BLOCK_N, E_PAD], tl.float32)
    for r in tl.static_range(R_SPLIT):
        logits += tl.load(logits_ptr + (r * N + tok[:, None]) * E + cols[None, :], mask=valid,
                          other=0.0)
    tau = tl.load(tau_ptr)
    if tau >= 1.0:
        keep = row_ok
    else:
        if TOPK:
            score = tl.where(valid, logits, float("-inf"))
            weight = valid.to(tl.float32)
            cut = _topk_count(tau, E).to(tl.float32)
        else:
            top = tl.max(tl.where(valid, logits, float("-inf")), axis=1)
            top = tl.where(row_ok, top, 0.0)
            ex = tl.where(valid, tl.exp(logits - top[:, None]), 0.0)
            z = tl.sum(ex, axis=1)
            score = ex / tl.where(z > 0, z, 1.0)[:, None]
            weight = score
            cut = tau
        own = tl.sum(tl.where(cols[None, :] == e, score, 0.0), axis=1)  # exactly score[:, e]
        above = _outranks(score, own[:, None], cols[None, :], e) & col_ok[None, :]
        keep = row_ok & (tl.sum(tl.where(above, weight, 0.0), axis=1) < cut)
    tl.store(bits_ptr + e, tl.sum(tl.where(keep, tl.full([BLOCK_N], 1, tl.int64)
                                           << tok.to(tl.int64), 0)))
    n_keep = tl.sum(keep.to(tl.int32), axis=0)
    if n_keep > 0:
        # only a kept expert's rows are read, and only now: loads in flight across the
        # selection made the kernel 50-100x slower with as many padded experts as threads
        # (GPU_RUNS.md runs 107 and 110)
        xk = tl.load(x_ptr + tok[:, None] * stride_xn + kk[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wu = tl.load(wu_ptr + nrn[:, None] * stride_uf + kk[None, :] * stride_uk, mask=w_ok,
                     other=0.0)
        if GATED:
            wg = tl.load(wg_ptr + nrn[:, None] * stride_gf + kk[None, :] * stride_gk,
                         mask=w_ok, other=0.0)
        wd = tl.load(wd_ptr + oo[None, :] * stride_do + nrn[:, None] * stride_df,
                     mask=n_ok[:, None] & o_ok[None, :], other=0.0)
        tl.atomic_add(counts_ptr, n_keep.to(tl.float64) * S, sem="relaxed")
        acc_u = _mac(xk, wu, tl.zeros([BLOCK_N, S_PAD], tl.float32), False, IEEE)
        if HAS_BU:
            acc_u += tl.load(bu_ptr + nrn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_g = _mac(xk, wg, tl.zeros([BLOCK_N, S_PAD], tl.float32), False, IEEE)
            if HAS_BG:
                acc_g += tl.load(bg_ptr + nrn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            h = _act(acc_g, ACT) * acc_u
        else:
            h = _act(acc_u, ACT)
        h = tl.where(keep[:, None] & n_ok[None, :], h, 0.0)
        y_part = _mac_nn(h, wd, tl.zeros([BLOCK_N, DO_PAD], tl.float32), False, IEEE)
        tl.atomic_add(acc_ptr + tok[:, None] * DO + oo[None, :], y_part,
                      mask=row_ok[:, None] & o_ok[None, :], sem="relaxed")
    # last program in writes y (as in _up_kernel: bar.sync, acq_rel ticket, .cg loads)
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        out = tok[:, None] * DO + oo[None, :]
        out_ok = row_ok[:, None] & o_ok[None, :]
        total = tl.load(acc_ptr + out, mask=out_ok, other=0.0, cache_modifier=".cg")
        if HAS_BD:
            total += tl.load(bd_ptr + oo, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + out, total.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _down_kernel(
    h_ptr, wd_ptr, stride_do, stride_df, bd_ptr, bits_ptr,
    acc_ptr, counter_ptr, y_ptr, scr_ptr,
    N, DO, F, E, S,
    HAS_BD: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    E_PAD: tl.constexpr, MAXE: tl.constexpr, KS: tl.constexpr,
):
    m = tl.program_id(0)          # token tile (fastest: tiles sharing weights run together)
    t = tl.program_id(1)
    dt = t // KS                  # output column tile
    ks = t % KS                   # slice of the tile's compact neurons
    eidx = tl.arange(0, E_PAD)
    bits = tl.load(bits_ptr + m * E + eidx, mask=eidx < E, other=0)
    active = bits != 0
    n_active = tl.sum(active.to(tl.int32), axis=0) * S
    q_start = ks * n_active // KS
    q_end = (ks + 1) * n_active // KS
    r0 = q_start // S
    rank = tl.cumsum(active.to(tl.int32), axis=0) - 1
    scr = (m * tl.num_programs(1) + t) * MAXE - r0
    tl.store(scr_ptr + scr + rank, eidx, mask=active & (rank >= r0) & (rank < r0 + MAXE))
    tl.debug_barrier()

    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    oo = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    o_ok = oo < DO
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for q0 in range(q_start, q_end, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        q_ok = q < q_end
        e = tl.load(scr_ptr + scr + q // S, mask=q_ok, other=0, cache_modifier=".cg")
        nrn = e * S + q % S
        h = tl.load(h_ptr + rows[:, None] * F + nrn[None, :],
                    mask=row_ok[:, None] & q_ok[None, :], other=0.0)
        w = tl.load(wd_ptr + oo[None, :] * stride_do + nrn[:, None] * stride_df,
                    mask=q_ok[:, None] & o_ok[None, :], other=0.0)
        acc = _mac_nn(h, w, acc, USE_DOT, IEEE)

    out = rows[:, None] * DO + oo[None, :]
    out_ok = row_ok[:, None] & o_ok[None, :]
    if KS == 1:
        if HAS_BD:
            acc += tl.load(bd_ptr + oo, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
    else:
        if q_end > q_start:
            tl.atomic_add(acc_ptr + out, acc, mask=out_ok, sem="relaxed")
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr + m * (tl.num_programs(1) // KS) + dt, 1,
                               sem="acq_rel")
        if ticket == KS - 1:
            total = tl.load(acc_ptr + out, mask=out_ok, other=0.0, cache_modifier=".cg")
            if HAS_BD:
                total += tl.load(bd_ptr + oo, mask=o_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + out, total.to(y_ptr.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------------------------
# launch plan


@dataclass(frozen=True)
class Plan:
    """Launch parameters for one shape. Field names are the override keys of `config=`."""
    tile_m: int             # tokens per tile (<= 64); decode: one tile holding all tokens
    select: str             # "fused" (in the up or expert kernel), "sorted" or "pairwise" kernel
    fuse_down: bool         # the up kernel also does the down projection (decode, narrow y)
    up_dot: bool            # tl.dot (tensor cores, tokens padded to 16) vs CUDA-core FMAs
    down_dot: bool
    router_dot: bool
    router_block_e: int
    router_block_k: int
    router_warps: int
    router_split: int       # router programs per block of experts, each a slice of d
    sel_n: int              # tokens per program of _select_sorted_kernel
    sel_e: int              # experts per program of _select_pairwise_kernel (one token each)
    sel_warps: int
    up_list: bool           # the selection kernel lists each tile's kept experts for _up_kernel
    up_by_expert: bool      # _expert_kernel instead of _up_kernel: a program per expert (tiny FFNs)
    up_programs: int        # programs per token tile of _up_kernel
    up_sub: int             # compact neurons per step
    up_block_k: int
    up_unit: int            # neurons are split among programs in multiples of this
    up_pool: int            # > 0: 1 / up_pool of the steps are claimed by programs done early
    up_warps: int
    up_stages: int
    down_block_q: int
    down_block_d: int
    down_ks: int
    down_warps: int
    down_stages: int


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter runs programs one after another: keep grids small


def plan(n_tokens: int, d: int, d_out: int, d_ff: int, expert_size: int, n_sm: int,
         kind: str | None = None, dot: bool | None = None, elem_bytes: int = 2,
         **overrides) -> Plan:
    """The shape table. Rules and the measurements they come from: benchmarks/KERNELS.md.

    kind: "decode" (persistent programs, each a slice of the union's neurons, exactly balanced)
    or "prefill" (one program per token tile x 64-neuron block, like a grouped GEMM); None picks
    decode up to DECODE_MAX_N tokens. dot: decode on tensor cores (None: above 2 tokens).
    elem_bytes: bytes per weight element (the pipelined tensor-core tiles must fit in shared
    memory). overrides: Plan fields."""
    n_exp = d_ff // expert_size
    e_pad = max(2, _pow2(n_exp))
    d_pad, do_pad = _pow2(d), _pow2(d_out)
    sel_e = min(e_pad, max(1, 8192 // e_pad))
    if kind is None:
        kind = "decode" if n_tokens <= DECODE_MAX_N else "prefill"
    if kind == "decode":
        n_pad = min(MAX_TILE_TOKENS, _pow2(n_tokens))
        # CUDA-core FMAs cost 2N flops per weight byte pair; past 2 tokens they stop hiding
        # under the loads, and tensor cores (tokens padded to 16) take over. H100, 4096x14336,
        # 25% active per token (GPU_RUNS.md): on CUDA cores 3 / 4 tokens took 246 / 292 us; on
        # tensor cores 8 / 16 tokens took 179 / 186 us
        if dot is None:
            dot = n_tokens > 2
        tile_m = max(16, n_pad) if dot else n_pad
        up_block_k = 128 if dot else min(d_pad, max(256, 4096 // n_pad))
        # CUDA cores: [SUB, BLOCK_K] weight tiles of <= 8192 elements keep the one-token kernel
        # (gate, up and down tiles in flight at once) near 80 registers: 2 programs per SM
        # tensor cores: wider steps keep more weight bytes in flight; 4096x14336, 8 tokens, 25%
        # active, H200 (runs 22, 23): 16 / 32 / 64 neurons per step 158.2 / 123.3 / 119.8 us.
        # 64 x 128 fp32 tiles (gate and up, 3 stages) would not fit in shared memory
        wide = 64 if elem_bytes <= 2 else 32
        up_sub = wide if dot else max(1, min(8, 8192 // (n_pad * up_block_k)))
        fuse_down = not dot and n_pad * do_pad <= 8192 and up_sub * do_pad <= 16384
        down_block_d = 128 if dot else min(do_pad, max(64, 4096 // n_pad))
        n_dtiles = triton.cdiv(d_out, down_block_d)
        # router: enough programs to stream router_w at full bandwidth; tensor cores when the
        # experts do (CUDA-core FMAs over 8 tokens took 17 us for a 7 MB router on an H100)
        router_dot = dot
        # one program per SM when few neurons per program remain (the per-program sort then
        # dominates): 576x1536 at 25%, H100: 11.3 us vs 13.1 with two (run 13); for 4096-wide
        # FFNs one per SM was slower at 25-50%, with 8 or 16 warps (runs 6 and 13)
        up_programs = n_sm if not dot and d_ff < 32 * n_sm else 2 * n_sm
        # CUDA cores, 2 x SMs programs: an eighth of the steps is claimed one at a time by the
        # programs done first (equal shares end unevenly); H200, run 101: 4096x14336 one token
        # 62.7 -> 60.5 us at 50% active, 100.6 -> 94.6 at 100% (8-neuron experts 73.8 -> 68.4
        # at 50%), 25% unchanged; batch 8 on tensor cores lost (102.9 -> 113.6)
        up_pool = 8 if not dot and up_programs == 2 * n_sm else 0
        # CUDA-core router: one expert's row per program (4096x14336, one token, 25% active,
        # H200, runs 25-26: 43.5 / 43.8 us vs 44.6 / 44.9 with two)
        rbe = 16 if router_dot else 1
        # (tl.dot blocks are >= 16 wide: a model narrower than that reads a masked block)
        rbk = (max(16, min(d_pad, 256)) if router_dot
               else min(d_pad, max(64, 8192 // (n_pad * rbe))))
        # tensor-core router: 16-expert blocks give too few programs to keep the HBM busy
        # (4096x14336: 56 programs, 9.9 us for 7 MB at batch 8 on an H100, run 14); split d
        # among ~2 x SMs programs, the readers sum the partial logits
        n_rblocks = triton.cdiv(n_exp, rbe)
        rsplit = (max(1, min(triton.cdiv(d, rbk), (2 * n_sm) // n_rblocks)) if router_dot
                  else 1)
        # selection (H200, runs 37-38, GPU_RUNS.md): one or two tokens select in every up
        # program (a sort; no launch) up to 512 experts, past that in the pairwise kernel
        # (4096x14336 at 25% active: 44.7 -> 41.5 us with 896 experts, 52.7 -> 44.7 with 1792;
        # 2048x8192 and 576x1536 stay fused: 22.6 vs 23.2, 11.4 vs 14.8). Its work grows with
        # tokens x E^2, so more tokens sort, one program per token (batch 8, 4096x14336 at 25%:
        # 100.1 vs 101.9 us with 896 experts, 127.1 vs 141.0 with 1792)
        if n_tokens > 2:
            select = "sorted"
        else:
            select = "fused" if e_pad <= 512 else "pairwise"
        base = dict(
            tile_m=tile_m, select=select, fuse_down=fuse_down,
            up_dot=dot, down_dot=dot, router_dot=router_dot,
            router_block_e=rbe, router_block_k=rbk, router_warps=4, router_split=rsplit,
            # sorted: a 2048-wide sort on 16 warps (run 33), 8 on tensor-core plans (run 26);
            # pairwise: [sel_e, E] comparisons per program on 4 warps (run 37)
            sel_n=1, sel_e=sel_e,
            sel_warps=4 if select == "pairwise" else 16 if e_pad > 1024 else 8 if dot else 4,
            up_programs=up_programs, up_sub=up_sub, up_block_k=up_block_k, up_unit=1,
            up_pool=up_pool,
            up_warps=4 if dot else 8, up_stages=3 if dot else 1,
            # 128 neurons per step: 123.3 -> 120.3 us (same case, run 23)
            down_block_q=wide * 2 if dot else max(1, min(16, 16384 // (n_pad * down_block_d))),
            # tensor cores: 16 slices of the neurons per column tile and 2 stages, and the
            # selection on 8 warps; 4096x14336, 8 tokens, H200 (run 26): 115.5 -> 101.4 us at
            # 25% active, 112.3 -> 99.4 at 100%; 4096x11008 at 25%: 95.9 -> 86.0 (w/o sel_warps)
            down_block_d=down_block_d,
            down_ks=16 if dot else max(1, (2 * n_sm) // n_dtiles),
            down_warps=4 if dot else 8, down_stages=2 if dot else 1,
        )
    elif kind == "prefill":
        tile_m = MAX_TILE_TOKENS
        n_mtiles = triton.cdiv(n_tokens, tile_m)
        up_sub = 64
        n_dtiles = triton.cdiv(d_out, 128)
        base = dict(
            tile_m=tile_m, select="sorted", fuse_down=False,
            up_dot=True, down_dot=True, router_dot=True,
            router_block_e=min(64, max(16, e_pad)), router_block_k=64, router_warps=4,
            router_split=1,
            sel_n=max(1, min(16, 8192 // e_pad)), sel_e=sel_e, sel_warps=4, up_list=False,
            up_programs=triton.cdiv(d_ff, up_sub), up_sub=up_sub, up_block_k=64,
            up_unit=up_sub, up_pool=0, up_warps=4, up_stages=3,
            down_block_q=64, down_block_d=128,
            down_ks=max(1, min(8, n_sm // (n_mtiles * n_dtiles))), down_warps=4, down_stages=3,
        )
    else:
        raise ValueError(f"plan: kind must be 'decode' or 'prefill', got {kind!r}")
    if kind == "decode":
        # the pairwise selection lists the kept experts and each up program copies its few
        # entries instead of a cumsum over E: faster with 1376-1792 experts (4096x14336 s8, one
        # token: 49.9 -> 47.5 us at 25% active, 76.8 -> 73.9 at 50%), slower with 688-896
        # (4096x14336 s16: 41.7 -> 43.8 us at 25%) for reasons not found (GPU_RUNS.md, run 94)
        base["up_list"] = (overrides.get("select", base["select"]) == "pairwise"
                           and e_pad > LIST_ABOVE)
    # launch-bound FFNs (1 x SMs plans, an expert's rows in one [SUB, d] tile): a program per
    # expert (H200, run 110, us before -> after at 25% active: 576x1536 one token 10.4 -> 8.8,
    # 8-neuron experts 11.6 -> 8.3; 640x2048 11.4 -> 8.9; 960x2560 12.3 -> 9.8; two tokens
    # 13.8 -> 11.8)
    def final(name):
        return overrides.get(name, base[name])
    base["up_by_expert"] = (kind == "decode" and final("fuse_down") and final("select") == "fused"
                            and final("up_programs") == n_sm and n_tokens <= 2
                            and _pow2(expert_size) * max(d_pad, do_pad) <= 16384)
    if base["up_by_expert"]:
        # one token on 4 warps (run 110, 576x1536 at 25%: 8.8 vs 9.3 us with 8, 8.3 vs 11.0 with
        # 8-neuron experts), two on 8 (11.8 vs 12.2)
        base["up_warps"] = 4 if n_tokens == 1 else 8
    base.update(overrides)
    p = Plan(**base)
    _check(p, n_tokens)
    return p


def _check(p: Plan, n_tokens: int):
    for name in ("tile_m", "sel_n", "sel_e", "up_sub", "up_block_k", "down_block_q",
                 "down_block_d", "router_block_e", "router_block_k"):
        v = getattr(p, name)
        if v < 1 or v & (v - 1):
            raise ValueError(f"plan: {name}={v} must be a power of two")
    if p.router_split < 1:
        raise ValueError(f"plan: router_split={p.router_split} must be >= 1")
    if p.tile_m > MAX_TILE_TOKENS or p.tile_m % p.sel_n:
        raise ValueError(f"plan: tile_m={p.tile_m} must be <= {MAX_TILE_TOKENS} and a multiple "
                         f"of sel_n={p.sel_n}")
    if p.select not in SELECTIONS:
        raise ValueError(f"plan: select={p.select!r}; allowed: {', '.join(SELECTIONS)}")
    if p.up_pool < 0 or p.up_pool == 1:
        raise ValueError(f"plan: up_pool={p.up_pool} must be 0 (off) or >= 2 (1 / up_pool of the "
                         "steps claimed)")
    if p.up_list and p.select == "fused":
        raise ValueError("plan: up_list needs a selection kernel (select 'sorted' or 'pairwise')")
    if p.up_by_expert and not (p.select == "fused" and p.fuse_down and p.tile_m <= 2
                               and n_tokens <= 2):
        raise ValueError("plan: up_by_expert needs one or two tokens, select='fused' and "
                         "fuse_down")
    if p.select == "fused" and n_tokens > p.tile_m:
        raise ValueError("plan: select='fused' needs all tokens in one tile")
    if not p.fuse_down and not p.down_dot and p.tile_m > 8:
        # measured wrong on an H100 (Triton 3.6, run 15): the CUDA-core down kernel with 16+
        # token tiles, whatever its block sizes or warps; right with 8, and in the interpreter.
        # No default plan runs it (1-2 tokens fuse the down projection or use 2-token tiles)
        raise ValueError(f"plan: the CUDA-core down kernel needs tile_m <= 8, got {p.tile_m} "
                         "(use down_dot=True for larger tiles)")
    if p.fuse_down and (p.up_dot or n_tokens > p.tile_m):
        raise ValueError("plan: fuse_down needs the CUDA-core up kernel and one tile")
    dots = [p.up_dot and (p.tile_m < 16 or p.up_sub < 16 or p.up_block_k < 16),
            p.down_dot and (p.tile_m < 16 or p.down_block_q < 16 or p.down_block_d < 16),
            p.router_dot and (p.tile_m < 16 or p.router_block_e < 16 or p.router_block_k < 16)]
    if any(dots):
        raise ValueError("plan: tl.dot needs every block dimension >= 16")


# ---------------------------------------------------------------------------------------------
# launcher


def sparse_ffn_triton(x, w_up, b_up, w_gate, b_gate, w_down, b_down, router_w, router_b,
                      tau, activation: str, expert_size: int, method: str = "prunepath",
                      stats=None, *, config: dict | None = None, return_keep: bool = False):
    """The sparse FFN on Triton kernels: (y [..., d_out] in x.dtype, stats).

    tau: 0-d float32 tensor on x's device (a Python float is accepted for convenience); it is
    only read by the kernels, so changing it needs no recompile and works in CUDA graphs.
    stats: float64 [2] on x's device, to which (active neurons summed over tokens, tokens) are
    added in place (None: a fresh zero pair, returned).
    method: as in the reference; "oracle" ranks experts by their share of the dense FFN's
    output, so it runs the reference. config: overrides of `plan()` fields (benchmarks and
    tests); return_keep: also return the kept mask [N, E] bool the kernels used (tests)."""
    d = x.shape[-1]
    x2d = x.reshape(-1, d)
    # the token count stays symbolic until the kernels need it: past DENSE_ABOVE (the only
    # guard), one dynamic prefill graph serves every prompt length
    n_tokens, d_ff, d_out = x2d.shape[0], int(w_up.shape[0]), int(w_down.shape[0])
    check_arguments(x, w_up, b_up, w_gate, b_gate, w_down, b_down, router_w, router_b,
                    activation, expert_size, method)
    n_exp = d_ff // expert_size
    too_big = n_tokens * max(d, d_ff, d_out) >= MAX_OFFSET or d_ff * max(d, d_out) >= MAX_OFFSET
    many = n_tokens > DENSE_ABOVE and config is None
    if stats is None:
        stats = torch.zeros(2, dtype=torch.float64, device=x.device)
    elif stats.dtype != torch.float64 or tuple(stats.shape) != (2,) or stats.device != x.device:
        # the kernels add into it with float64 atomics
        raise ValueError(f"stats must be a float64 pair on {x.device}, got {stats.dtype} "
                         f"{tuple(stats.shape)} on {stats.device}")
    if method == "oracle" or n_exp > MAX_EXPERTS or too_big or many or n_tokens == 0:
        y, counts = sparse_ffn_reference(x, w_up, b_up, w_gate, b_gate, w_down, b_down, router_w,
                                         router_b, tau, activation, expert_size, method)
        stats.add_(counts)
        return (y, stats, None) if return_keep else (y, stats)
    n_tokens = int(n_tokens)  # the launch plan is chosen per token count
    if not isinstance(tau, torch.Tensor):
        tau = torch.full((), float(tau), dtype=torch.float32, device=x.device)
    elif tau.device != x.device:
        raise ValueError(f"tau is on {tau.device}, x on {x.device}: the kernels read tau in place")
    elif tau.dtype != torch.float32:
        tau = tau.float()

    p = plan(n_tokens, d, d_out, d_ff, expert_size, _num_sms(x.device),
             elem_bytes=x.element_size(), **(config or {}))
    # the kernels index biases with unit stride (a no-op for the contiguous ones models have)
    b_up, b_gate, b_down, router_b = (None if b is None else b.contiguous()
                                      for b in (b_up, b_gate, b_down, router_b))
    # Triton launches on the current CUDA device: make it x's (a model on cuda:1 called eagerly
    # while cuda:0 is current; Inductor's generated code sets the device itself)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        y, bits = _launch(x2d, w_up, b_up, w_gate, b_gate, w_down, b_down, router_w, router_b,
                          tau, stats, ACTIVATIONS[activation], method in TOPK_METHODS,
                          expert_size, p)
    y = y.reshape(*x.shape[:-1], d_out)
    if not return_keep:
        return y, stats
    tok = torch.arange(n_tokens, device=x.device)
    keep = (bits[tok // p.tile_m] >> (tok % p.tile_m)[:, None]) & 1
    return y, stats, keep.bool()


def _launch(x2d, w_up, b_up, w_gate, b_gate, w_down, b_down, router_w, router_b, tau, counts,
            act, topk, s, p: Plan):
    dev, dtype = x2d.device, x2d.dtype
    n, d = x2d.shape
    d_ff, d_out = w_up.shape[0], w_down.shape[0]
    n_exp = d_ff // s
    e_pad = max(2, _pow2(n_exp))
    ieee = dtype == torch.float32
    n_mtiles = triton.cdiv(n, p.tile_m)
    n_dtiles = triton.cdiv(d_out, p.down_block_d)
    split_down = not p.fuse_down and p.down_ks > 1

    def dummy(dt):
        return _empty((1,), dt, dev)

    need_acc = p.fuse_down or split_down
    n_counters = n_mtiles if p.fuse_down else n_mtiles * n_dtiles if split_down else 0
    logits = _empty((p.router_split, n, n_exp), torch.float32, dev)  # partial sums over d
    # bits [tiles, E] flat; with up_list each tile's count of listed experts follows them
    n_bits = n_mtiles * n_exp
    bits = _empty((n_bits + (n_mtiles if p.up_list else 0),), torch.int64, dev)
    y = _empty((n, d_out), dtype, dev)
    acc = _empty((n, d_out), torch.float32, dev) if need_acc else dummy(torch.float32)
    n_work = n_mtiles if p.up_pool else 0  # the tiles' claimed-step counters follow
    counters = _empty((max(1, n_counters + n_work),), torch.int32, dev)
    # up_list: the tiles' kept experts in the order they were found (their counts live in bits,
    # zeroed with them: one buffer, not a view, as Inductor copies slices of mutated buffers)
    listed = _empty((n_bits,), torch.int32, dev) if p.up_list else dummy(torch.int32)
    h = dummy(dtype) if p.fuse_down else _empty((n, d_ff), dtype, dev)

    # 1. router logits, and zeroing of what later kernels accumulate into (bits: atomic_or,
    #    acc: atomic_add, counters: arrival tickets); the fused selection writes bits itself
    r_block_n = p.tile_m if p.router_dot else min(16, _pow2(n))
    r_grid = (triton.cdiv(n_exp, p.router_block_e) * p.router_split, triton.cdiv(n, r_block_n))
    r_steps = triton.cdiv(triton.cdiv(d, p.router_block_k), p.router_split)
    n_zero_bits = 0 if p.select == "fused" else bits.numel()
    n_zero_acc = acc.numel() if need_acc else 0
    n_zero = max(n_zero_bits, n_zero_acc, n_counters + n_work, 1)
    zblock = min(1024, _pow2(triton.cdiv(n_zero, r_grid[0] * r_grid[1])))
    wrap_triton(_router_kernel)[r_grid](
        x2d, x2d.stride(0), x2d.stride(1), router_w, router_w.stride(0), router_w.stride(1),
        router_b, logits, tau, counts,
        bits, n_zero_bits, acc, n_zero_acc, counters, n_counters + n_work,
        n, d, n_exp,
        USE_DOT=p.router_dot, IEEE=ieee or router_w.dtype != dtype,
        BLOCK_N=r_block_n, BLOCK_E=p.router_block_e, BLOCK_K=p.router_block_k,
        K_STEPS=r_steps, SPLIT=p.router_split, ZBLOCK=zblock,
        num_warps=p.router_warps,
    )

    # 2. selection
    if p.select == "sorted":
        wrap_triton(_select_sorted_kernel)[(triton.cdiv(n, p.sel_n),)](
            logits, tau, bits, counts, listed, n_bits, n, n_exp, s,
            TOPK=topk, TILE_M=p.tile_m, SEL_N=p.sel_n, E_PAD=e_pad, SPLIT=p.router_split,
            LIST=p.up_list, num_warps=p.sel_warps,
        )
    elif p.select == "pairwise":
        wrap_triton(_select_pairwise_kernel)[(n, triton.cdiv(n_exp, p.sel_e))](
            logits, tau, bits, counts, listed, n_bits, n, n_exp, s,
            TOPK=topk, TILE_M=p.tile_m, SEL_E=p.sel_e, E_PAD=e_pad, SPLIT=p.router_split,
            LIST=p.up_list, num_warps=p.sel_warps,
        )

    # 3. up (+ down when fused)
    gated = w_gate is not None
    wg = w_gate if gated else w_up
    wd_strides = (w_down.stride(0), w_down.stride(1))
    if p.up_by_expert:
        wrap_triton(_expert_kernel)[(n_exp,)](
            x2d, x2d.stride(0), x2d.stride(1),
            w_up, w_up.stride(0), w_up.stride(1), b_up if b_up is not None else dummy(dtype),
            wg, wg.stride(0), wg.stride(1), b_gate if b_gate is not None else dummy(dtype),
            w_down, *wd_strides, b_down if b_down is not None else dummy(dtype),
            logits, tau, bits, counts, acc, counters, y,
            n, d, d_out, n_exp, s,
            ACT=act, GATED=gated, HAS_BU=b_up is not None,
            HAS_BG=gated and b_gate is not None, HAS_BD=b_down is not None,
            TOPK=topk, IEEE=ieee, BLOCK_N=p.tile_m, S_PAD=_pow2(s), D_PAD=_pow2(d),
            DO_PAD=_pow2(d_out), E_PAD=e_pad, R_SPLIT=p.router_split,
            num_warps=p.up_warps,
        )
        return y, bits[:n_bits].view(n_mtiles, n_exp)
    # scratch rows: the experts one program touches (see _up_kernel); with up_pool, one row of E
    # per tile after them: the pool's experts
    span = triton.cdiv(triton.cdiv(d_ff, p.up_unit), p.up_programs) * p.up_unit
    if p.up_pool:  # pooled plans give each program whole steps of up_sub neurons
        span = max(span, triton.cdiv(triton.cdiv(d_ff, p.up_sub), p.up_programs) * p.up_sub)
    up_maxe = (span - 1) // s + 2
    n_scr = n_mtiles * (p.up_programs * up_maxe + (n_exp if p.up_pool else 0))
    scr_e = _empty((n_scr,), torch.int32, dev)
    scr_b = _empty((n_scr,), torch.int64, dev)
    wrap_triton(_up_kernel)[(n_mtiles, p.up_programs)](
        x2d, x2d.stride(0), x2d.stride(1),
        w_up, w_up.stride(0), w_up.stride(1), b_up if b_up is not None else dummy(dtype),
        wg, wg.stride(0), wg.stride(1), b_gate if b_gate is not None else dummy(dtype),
        w_down, *wd_strides, b_down if b_down is not None else dummy(dtype),
        logits, tau, bits, counts, listed, n_bits,
        h, acc, counters, n_counters, y, scr_e, scr_b,
        n, d, d_out, d_ff, n_exp, s,
        ACT=act, GATED=gated, HAS_BU=b_up is not None, HAS_BG=gated and b_gate is not None,
        HAS_BD=b_down is not None,
        TOPK=topk, FUSED_SELECT=p.select == "fused", LISTED=p.up_list, FUSE_DOWN=p.fuse_down,
        USE_DOT=p.up_dot,
        IEEE=ieee,
        BLOCK_N=p.tile_m, SUB=p.up_sub, BLOCK_K=p.up_block_k,
        K_STEPS=triton.cdiv(d, p.up_block_k), DO_PAD=_pow2(d_out),
        E_PAD=e_pad, MAXE=up_maxe, MAXE_PAD=_pow2(up_maxe), UNIT=p.up_unit, POOL=p.up_pool,
        R_SPLIT=p.router_split,
        num_warps=p.up_warps, num_stages=p.up_stages,
    )

    # 4. down
    if not p.fuse_down:
        down_maxe = (triton.cdiv(d_ff, p.down_ks) - 1) // s + 2
        scr_d = _empty((n_mtiles * n_dtiles * p.down_ks * down_maxe,), torch.int32, dev)
        wrap_triton(_down_kernel)[(n_mtiles, n_dtiles * p.down_ks)](
            h, w_down, *wd_strides, b_down if b_down is not None else dummy(dtype), bits,
            acc, counters, y, scr_d,
            n, d_out, d_ff, n_exp, s,
            HAS_BD=b_down is not None, USE_DOT=p.down_dot, IEEE=ieee,
            BLOCK_M=p.tile_m, BLOCK_Q=p.down_block_q, BLOCK_D=p.down_block_d,
            E_PAD=e_pad, MAXE=down_maxe, KS=p.down_ks,
            num_warps=p.down_warps, num_stages=p.down_stages,
        )
    return y, bits[:n_bits].view(n_mtiles, n_exp)

