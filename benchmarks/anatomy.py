"""Where the fixed cost of the one-token sparse FFN goes (GPU experiment, one call, ~2 minutes).

    python benchmarks/anatomy.py --out DIR

The kernel table (benchmarks/results/kernels.json) fits time = ~22 us + 1.08 x floor at batch 1
on 4096x14336: the bytes stream well, but something costs ~22 us per call whatever tau keeps.
This script times a one-token variant of the fused up+down kernel (`_probe_kernel`, SwiGLU, no
biases) with parts switched off or replaced, on the same problems as the kernel table (K weight
copies larger than L2, CUDA-graph replays, median per call):

  SELECT  0: softmax + sort + top-p cut in every program (as the product kernel does today)
          1: a precomputed kept mask is loaded instead (the cost of the selection itself)
  STAGE   0: expert ids staged through a global scratch row + barrier, re-read every step
          1: the program's few expert ids found once in registers (no scratch round trips)
  EPI     0: fp32 atomics into a shared accumulator, then an arrival ticket and the last
             program writes y (today's epilogue)
          1: atomics only (y left in the fp32 accumulator for a later cast)
          2: no reduction at all (wrong result; bounds what the reduction costs)

It also times the router kernel alone, an empty kernel (launch cost inside a graph), the product
op end to end, and a plain streaming read of the same bytes. Numbers only, no pass/fail: the
findings go to benchmarks/results/GPU_RUNS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernels import Weights, copies_for, new_stats, time_calls  # noqa: E402
from ppcompile.kernels.triton_ffn import _mac, _mac_nn, _select  # noqa: E402

SHAPES = [(4096, 14336), (576, 1536)]
FRACTIONS = [0.0, 0.25, 0.5]   # 0.0: one expert (the fixed cost alone)
EXPERT_SIZE = 16


@triton.jit
def _probe_kernel(x_ptr, wu_ptr, wg_ptr, wd_ptr, stride_df, logits_ptr, keep_ptr, tau_ptr,
                  acc_ptr, counter_ptr, y_ptr, scr_ptr, D, DO, E, S,
                  SELECT: tl.constexpr, STAGE: tl.constexpr, EPI: tl.constexpr,
                  SUB: tl.constexpr, BLOCK_K: tl.constexpr, DO_PAD: tl.constexpr,
                  E_PAD: tl.constexpr, MAXE: tl.constexpr):
    p = tl.program_id(0)
    P = tl.num_programs(0)
    tok = tl.arange(0, 1)
    eidx = tl.arange(0, E_PAD)
    if SELECT == 0:
        valid = (tok[:, None] < 1) & (eidx[None, :] < E)
        logits = tl.load(logits_ptr + tok[:, None] * E + eidx[None, :], mask=valid,
                         other=float("-inf"))
        keep = _select(logits, valid, tok < 1, tl.load(tau_ptr), E, False)
        active = tl.sum(keep.to(tl.int32), axis=0) != 0
    else:
        active = tl.load(keep_ptr + eidx, mask=eidx < E, other=0) != 0
    n_active = tl.sum(active.to(tl.int32), axis=0) * S
    # slices in multiples of SUB (SUB divides S): every step stays inside one expert
    n_units = n_active // SUB
    q_start = (p * n_units // P) * SUB
    q_end = ((p + 1) * n_units // P) * SUB
    r0 = q_start // S
    rank = tl.cumsum(active.to(tl.int32), axis=0) - 1
    if STAGE == 0:
        scr = p * MAXE - r0
        tl.store(scr_ptr + scr + rank, eidx, mask=active & (rank >= r0) & (rank < r0 + MAXE))
        tl.debug_barrier()
    else:
        j = tl.arange(0, MAXE)
        hit = active[None, :] & (rank[None, :] == (r0 + j)[:, None])
        ids = tl.sum(tl.where(hit, eidx[None, :], 0), axis=1)   # the program's experts

    kk = tl.arange(0, BLOCK_K)
    oo = tl.arange(0, DO_PAD)
    sub = tl.arange(0, SUB)
    xk = tl.load(x_ptr + tok[:, None] * D + kk[None, :], mask=kk[None, :] < D, other=0.0)
    y_acc = tl.zeros([1, DO_PAD], tl.float32)
    for q0 in range(q_start, q_end, SUB):
        if STAGE == 0:
            e = tl.load(scr_ptr + scr + q0 // S, cache_modifier=".cg")
        else:
            e = tl.sum(tl.where(j == q0 // S - r0, ids, 0), axis=0)
        nrn = e * S + q0 % S + sub
        wd = tl.load(wd_ptr + oo[None, :] + nrn[:, None] * stride_df,
                     mask=(oo < DO)[None, :], other=0.0)
        w_ok = kk[None, :] < D
        wu = tl.load(wu_ptr + nrn[:, None] * D + kk[None, :], mask=w_ok, other=0.0)
        wg = tl.load(wg_ptr + nrn[:, None] * D + kk[None, :], mask=w_ok, other=0.0)
        acc_u = _mac(xk, wu, tl.zeros([1, SUB], tl.float32), False, False)
        acc_g = _mac(xk, wg, tl.zeros([1, SUB], tl.float32), False, False)
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        y_acc = _mac_nn(h, wd, y_acc, False, False)

    out = tok[:, None] * DO + oo[None, :]
    out_ok = oo[None, :] < DO
    if EPI == 2:
        # keep the work alive without reducing it (the value is never true in practice)
        total = tl.sum(tl.sum(y_acc, axis=1), axis=0)
        if total == 12345.678:
            tl.store(acc_ptr + p, total)
    else:
        if q_end > q_start:
            tl.atomic_add(acc_ptr + out, y_acc, mask=out_ok, sem="relaxed")
        if EPI == 0:
            tl.debug_barrier()
            # the counter is never reset: every call adds exactly P
            ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
            if ticket % P == P - 1:
                total = tl.load(acc_ptr + out, mask=out_ok, other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + out, total.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _empty_kernel(ptr):
    if tl.program_id(0) == 100000:
        tl.store(ptr, 1.0)


@triton.jit
def _stream_kernel(w_ptr, n_per_prog, out_ptr, BLOCK: tl.constexpr):
    """Each program sums its contiguous n_per_prog elements: the bytes alone, no indirection."""
    p = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    base = p.to(tl.int64) * n_per_prog
    for i in range(0, n_per_prog, BLOCK):
        acc += tl.load(w_ptr + base + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + p, tl.sum(acc, axis=0))


class Problem:
    """K weight copies, each with its own random kept set of round(f * E) experts (>= 1)."""

    def __init__(self, d, d_ff, fraction, copies, gen):
        self.d, self.d_ff = d, d_ff
        self.n_exp = d_ff // EXPERT_SIZE
        self.weights = Weights(d, d_ff, copies)
        k = max(1, round(fraction * self.n_exp))
        self.kept = k
        self.keeps, self.logits = [], []
        for _ in range(copies):
            keep = torch.zeros(self.n_exp, dtype=torch.int32)
            keep[torch.randperm(self.n_exp, generator=gen)[:k]] = 1
            self.keeps.append(keep.cuda())
            self.logits.append((keep.float() * 40 - 20)[None].cuda())


def probe_call(x, w, logits, keep, tau, ws, n_exp, plan, select, stage, epi, programs):
    w_gate, w_up, w_down = w
    d, d_out = x.shape[1], w_down.shape[0]
    span = triton.cdiv(w_up.shape[0], programs)
    maxe = triton.next_power_of_2((span - 1) // EXPERT_SIZE + 2)
    _probe_kernel[(programs,)](
        x, w_up, w_gate, w_down, w_down.stride(1), logits, keep, tau,
        ws["acc"], ws["counter"], ws["y"], ws["scr"], d, d_out, n_exp, EXPERT_SIZE,
        SELECT=select, STAGE=stage, EPI=epi, SUB=plan["sub"], BLOCK_K=plan["block_k"],
        DO_PAD=triton.next_power_of_2(d_out), E_PAD=max(2, triton.next_power_of_2(n_exp)),
        MAXE=maxe, num_warps=plan["warps"])


def workspace(d_out, programs, device):
    return dict(acc=torch.zeros(d_out, dtype=torch.float32, device=device),
                counter=torch.zeros(1, dtype=torch.int32, device=device),
                y=torch.empty(d_out, dtype=torch.bfloat16, device=device),
                scr=torch.zeros(programs * 64, dtype=torch.int32, device=device))


def probe_plan(d):
    """The product plan for one token on CUDA cores (triton_ffn.plan, decode kind)."""
    block_k = min(triton.next_power_of_2(d), 4096)
    return dict(block_k=block_k, sub=max(1, min(8, 8192 // block_k)), warps=8)


def run(out_dir: Path):
    from ppcompile.kernels import gpu_op  # noqa: F401  registers the op

    op = torch.ops.ppcompile.sparse_ffn_triton
    props = torch.cuda.get_device_properties(0)
    n_sm = props.multi_processor_count
    l2 = getattr(props, "L2_cache_size", 0) or 60e6
    gen = torch.Generator().manual_seed(5)
    tau = torch.tensor(0.999, device="cuda")
    records = []

    def record(**kw):
        records.append(dict(gpu=props.name, **kw))
        print(json.dumps(records[-1]), flush=True)
        (out_dir / "anatomy.json").write_text(json.dumps(records, indent=1))

    dummy = torch.zeros(1, device="cuda")
    record(case="empty kernel, 264 programs",
           us=time_calls([lambda: _empty_kernel[(2 * n_sm,)](dummy)] * 32))
    for d, d_ff in SHAPES:
        copies = copies_for(d, d_ff, l2)
        plan = probe_plan(d)
        for fraction in FRACTIONS:
            pb = Problem(d, d_ff, fraction, copies, gen)
            x = torch.randn(1, d, generator=gen).to("cuda", torch.bfloat16)
            sets = list(zip(pb.weights.sets, pb.logits, pb.keeps))
            floor_bytes = pb.kept * EXPERT_SIZE * 3 * d * 2
            tag = dict(shape=f"{d}x{d_ff}", fraction=fraction, experts_kept=pb.kept,
                       active_bytes=floor_bytes)
            # the product op (router on a +-20 router that keeps exactly these experts)
            routers = []
            for keep in pb.keeps:
                rw = torch.zeros(pb.n_exp, d, dtype=torch.bfloat16, device="cuda")
                rb = (keep.float() * 40 - 20).to(torch.bfloat16)
                routers.append((rw, rb))
            stats = new_stats()
            record(case="product op (router + up)", **tag, us=time_calls(
                [lambda w=w, r=r: op(x, w[1], None, w[0], None, w[2], None, *r, tau, stats,
                                     "silu", EXPERT_SIZE, "prunepath")
                 for (w, _, _), r in zip(sets, routers)]))
            for programs in (n_sm, 2 * n_sm):
                ws = workspace(d, programs, "cuda")
                for select, stage, epi in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 2),
                                           (1, 1, 1), (1, 1, 2), (0, 1, 1)]:
                    if programs == n_sm and (select, stage, epi) not in [(0, 0, 0), (0, 1, 1)]:
                        continue
                    us = time_calls([lambda w=w, lg=lg, kp=kp: probe_call(
                        x, w, lg, kp, tau, ws, pb.n_exp, plan, select, stage, epi, programs)
                        for w, lg, kp in sets])
                    record(case=f"probe SELECT={select} STAGE={stage} EPI={epi}",
                           programs=programs, **tag, us=us)
            # the same bytes streamed contiguously by 2 x SMs programs
            if fraction > 0:
                flat = [torch.cat([w[0].flatten(), w[1].flatten()]) for w, _, _ in sets]
                n_el = floor_bytes // 2 // (2 * n_sm) // 4096 * 4096
                outb = torch.empty(2 * n_sm, device="cuda")
                record(case="contiguous stream of the active bytes", **tag, us=time_calls(
                    [lambda f=f: _stream_kernel[(2 * n_sm,)](f, n_el, outb, BLOCK=4096)
                     for f in flat]))
            del pb, sets, routers
            torch.cuda.empty_cache()
    return records


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/anatomy.py needs a CUDA GPU; nothing was measured.")
        sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    run(args.out)


if __name__ == "__main__":
    main()
