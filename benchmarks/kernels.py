"""GPU benchmark of the Triton sparse-FFN kernels: one call on an H200, under 8 minutes.

    python benchmarks/kernels.py --out DIR [--skip decode profile prefill sweep]

Sections (each prints as it goes; later ones are skipped, with a note, past --budget-s):
 1. numerics: torch.ops.ppcompile.sparse_ffn_triton vs the torch reference (bf16 with 1/3/8/64
    tokens, fp32 with 1/8/64; taus 0.5/0.9/1.0), through torch.compile, and tau changed under a
    captured CUDA graph: PASS/FAIL lines.
 2. bandwidth: a streaming-read Triton kernel over 2 GiB (read bytes / time: the floor's
    bandwidth) and a 1 GiB device-to-device copy (reported as read bytes / time and as
    (read + written) / time).
 3. decode: shapes 576x1536, 2048x8192, 4096x11008, 4096x14336 (d_model x d_ff), SwiGLU, bf16,
    expert size 16, active fractions 0.125/0.25/0.5/1, batch 1 and 8: ours (router + selection +
    experts), dense (cuBLAS via F.linear), Inductor (torch.compile of the dense FFN) -> kernels.json
 4. per-kernel device times (torch.profiler) of a few decode cases -> kernels_profile.json
 5. many tokens: N = 1, 2, 3, 4, 8, 16, 64, 256 (PREFILL_TOKENS) on 4096x14336: ours with the
    decode plan and with the prefill plan vs dense -> kernels_prefill.json
 6. launch-plan sweep of the decode cases that set the plan table -> kernels_sweep.json
Then a summary table.

Method. Every timing is a CUDA graph of K consecutive calls, each on its own copy of the
weights (K copies together exceed L2 several times, so every call streams from HBM, as in a
model), replayed many times; a call's time is the median replay time / K. The active fraction
is set exactly: token n's input has a one in dimension n and the router has +-20 in column n, so
its logits are +20 on its chosen experts and -20 elsewhere; with tau = 0.999 exactly the chosen
experts are kept (checked against the op's counts). At 100% active tau is 1.0 in the decode
table, as a user runs the dense model (the kernels then skip the selection); the many-token
table keeps tau = 0.999 there (every expert chosen, the selection still run). Batch-8 tokens
choose independent random sets; the floor then counts the union's bytes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(576, 1536), (2048, 8192), (4096, 11008), (4096, 14336)]
FRACTIONS = [0.125, 0.25, 0.5, 1.0]
BATCHES = [1, 8]
EXPERT_SIZE = 16
TAU = 0.999
TAU_ALL = 1.0   # what a user sets for 100% active
PREFILL_TOKENS = [1, 2, 3, 4, 8, 16, 64, 256]  # where cuBLAS starts to win: DENSE_ABOVE
PREFILL_SHAPE = (4096, 14336)
BRIEF_READ_BW = 4.39e12  # the bandwidth the targets were set with


class Clock:
    def __init__(self, budget_s):
        self.t0, self.budget = time.time(), budget_s

    def elapsed(self):
        return time.time() - self.t0

    def left(self):
        return self.budget - self.elapsed()

    def log(self, msg):
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# timing


def time_calls(calls, reps=40):
    """Per-call microseconds: CUDA graph of all calls (one per weight copy), median replay / K."""
    for c in calls:  # compile and warm up outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


@contextlib.contextmanager
def direct_launches():
    """Launch the kernels straight from the launcher (plan overrides), not through the op."""
    from ppcompile.kernels import triton_ffn

    saved = triton_ffn.wrap_triton
    triton_ffn.wrap_triton = lambda kernel: kernel
    try:
        yield triton_ffn
    finally:
        triton_ffn.wrap_triton = saved


# ---------------------------------------------------------------------------------------------
# problem construction


class Weights:
    """K copies of a SwiGLU FFN in the layouts the core hands the op (w_down column-major)."""

    def __init__(self, d, d_ff, copies, dtype=torch.bfloat16):
        self.d, self.d_ff, self.n_exp = d, d_ff, d_ff // EXPERT_SIZE
        self.sets = []
        for _ in range(copies):
            w_gate = torch.randn(d_ff, d, device="cuda", dtype=dtype) * d ** -0.5
            w_up = torch.randn(d_ff, d, device="cuda", dtype=dtype) * d ** -0.5
            w_down_t = torch.randn(d_ff, d, device="cuda", dtype=dtype) * d_ff ** -0.5
            self.sets.append((w_gate, w_up, w_down_t.t()))

    def bytes_per_copy(self):
        return 3 * self.d * self.d_ff * self.sets[0][0].element_size()


def routed_inputs(d, n_exp, n_tokens, fraction, copies, gen, dtype=torch.bfloat16):
    """x [n_tokens, d] and, per weight copy, a router making token n keep exactly a random
    set of round(fraction * n_exp) experts (see module docstring). Returns x, routers, and the
    union fraction and total kept experts of each copy."""
    k = max(1, round(fraction * n_exp))
    x = torch.randn(n_tokens, d, generator=gen).to(dtype)
    x[:, :n_tokens] = torch.eye(n_tokens).to(dtype)
    routers, unions, kept = [], [], []
    for _ in range(copies):
        w = torch.zeros(n_exp, d, dtype=dtype)
        union = torch.zeros(n_exp, dtype=torch.bool)
        for n in range(n_tokens):
            chosen = torch.randperm(n_exp, generator=gen)[:k]
            w[:, n] = -20.0
            w[chosen, n] = 20.0
            union[chosen] = True
        routers.append((w.cuda(), torch.zeros(n_exp, dtype=dtype, device="cuda")))
        unions.append(union.float().mean().item())
        kept.append(n_tokens * k)
    return x.cuda(), routers, unions, kept


def dense_ffn(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def new_stats():
    """A statistics pair for the op to add its counts into."""
    return torch.zeros(2, dtype=torch.float64, device="cuda")


def copies_for(d, d_ff, l2_bytes):
    """Enough weight copies that the least data any timed call touches (12.5% of the weights
    plus the router), times K, is 2.5x the L2."""
    touched = 0.125 * 3 * d * d_ff * 2 + (d_ff // EXPERT_SIZE) * d * 2
    return max(3, min(256, math.ceil(2.5 * l2_bytes / touched)))


# ---------------------------------------------------------------------------------------------
# 1. numerics


def mass_before(logits):
    p = logits.float().softmax(-1)
    ranked, order = p.sort(-1, descending=True)
    return torch.zeros_like(p).scatter(-1, order, ranked.cumsum(-1) - ranked)


def check_numerics(clock):
    from ppcompile.kernels.reference import router_logits, sparse_ffn_reference

    op = torch.ops.ppcompile.sparse_ffn_triton
    results = []
    gen = torch.Generator().manual_seed(0)
    d, d_ff = 768, 3072  # E = 192: neither d nor E a power of two

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    base = dict(w_up=rnd(d_ff, d, scale=d ** -0.5), b_up=None, w_gate=rnd(d_ff, d, scale=d ** -0.5),
                b_gate=None, w_down=rnd(d_ff, d, scale=d_ff ** -0.5).t(), b_down=rnd(d),
                router_w=rnd(d_ff // EXPERT_SIZE, d, scale=2 * d ** -0.5),
                router_b=rnd(d_ff // EXPERT_SIZE))

    def report(name, ok, detail):
        results.append(dict(check=name, ok=bool(ok), detail=detail))
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)

    for dtype in (torch.bfloat16, torch.float32):
        ffn = {k: (v.to("cuda", dtype) if v is not None else None) for k, v in base.items()}
        ffn_hi = {k: (v.double() if v is not None else None) for k, v in ffn.items()}
        for n in (1, 3, 8, 64) if dtype == torch.bfloat16 else (1, 8, 64):
            x = rnd(n, d).to("cuda", dtype)
            for tau_value in (0.5, 0.9, 1.0):
                tau = torch.tensor(tau_value, device="cuda")
                counts = new_stats()
                y = op(x, *ffn.values(), tau, counts, "silu", EXPERT_SIZE, "prunepath")
                y_ref, counts_ref = sparse_ffn_reference(x, **ffn, tau=tau, activation="silu",
                                                         expert_size=EXPERT_SIZE)
                y_hi, _ = sparse_ffn_reference(x.double(), **ffn_hi, tau=tau, activation="silu",
                                               expert_size=EXPERT_SIZE)
                near = ((mass_before(router_logits(x, ffn["router_w"], ffn["router_b"]))
                         - tau_value).abs() <= 1e-5) & (tau_value < 1)
                ok_rows = ~near.any(1)
                err = ((y.double() - y_hi)[ok_rows].norm() / y_hi[ok_rows].norm()).item()
                ref_err = ((y_ref.double() - y_hi)[ok_rows].norm() / y_hi[ok_rows].norm()).item()
                tol = max(2 * ref_err, 1e-2) if dtype == torch.bfloat16 else 1e-5
                counts_ok = bool(near.any()) or torch.equal(counts, counts_ref)
                report(f"{str(dtype)[6:]} n={n} tau={tau_value}",
                       err <= tol and counts_ok and torch.isfinite(y).all(),
                       f"rel err {err:.2e} (torch reference in this dtype {ref_err:.2e}, "
                       f"limit {tol:.1e}), counts {counts.tolist()} vs {counts_ref.tolist()}"
                       + (f", {int(near.any(1).sum())} boundary tokens skipped"
                          if near.any() else ""))
        clock.log(f"numerics {dtype} done")

    # through Inductor, and a captured graph following tau
    ffn = {k: (v.to("cuda", torch.bfloat16) if v is not None else None) for k, v in base.items()}
    for n in (1, 64):
        x = rnd(n, d).to("cuda", torch.bfloat16)
        tau = torch.tensor(0.8, device="cuda")
        counts_c, counts_e = new_stats(), new_stats()
        fn = torch.compile(lambda *a: op(*a, tau, counts_c, "silu", EXPERT_SIZE, "prunepath"),
                           fullgraph=True, dynamic=False)
        y_c = fn(x, *ffn.values())
        y_e = op(x, *ffn.values(), tau, counts_e, "silu", EXPERT_SIZE, "prunepath")
        err = ((y_c.float() - y_e.float()).norm() / y_e.float().norm()).item()
        report(f"torch.compile n={n}", err < 1e-2 and torch.equal(counts_c, counts_e),
               f"rel diff to eager {err:.1e}")
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        counts_g, counts_e = new_stats(), new_stats()
        with torch.cuda.graph(graph):
            y_g = op(x, *ffn.values(), tau, counts_g, "silu", EXPERT_SIZE, "prunepath")
        tau.fill_(0.3)
        graph.replay()
        y_e = op(x, *ffn.values(), tau, counts_e, "silu", EXPERT_SIZE, "prunepath")
        report(f"cuda graph, tau 0.8 -> 0.3, n={n}",
               torch.equal(counts_g, counts_e) and torch.allclose(y_g, y_e, atol=1e-2, rtol=1e-2),
               f"counts {counts_g.tolist()} vs eager {counts_e.tolist()}")
    return results


# ---------------------------------------------------------------------------------------------
# 2. bandwidth


def measure_bandwidth():
    import triton
    import triton.language as tl

    @triton.jit
    def read_kernel(ptr, out_ptr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        v = tl.load(ptr + pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK))
        tl.store(out_ptr + pid, tl.sum(v.to(tl.float32)))

    n_bytes = 2 << 30

    def read_once():
        block = 8192
        buf = torch.ones(n_bytes // 2, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(buf.numel() // block, device="cuda")
        return time_calls([lambda: read_kernel[(out.numel(),)](buf, out, BLOCK=block)], reps=20)

    def copy_once():
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        return time_calls([lambda: dst.copy_(src)], reps=20)

    read_us, copy_us = read_once(), copy_once()
    torch.cuda.empty_cache()
    return dict(read_bw=n_bytes / read_us * 1e6, read_method="Triton kernel summing a 2 GiB "
                "bf16 buffer, 16 KiB per program: bytes read / time",
                copy_read_bw=(1 << 30) / copy_us * 1e6,
                copy_total_bw=2 * (1 << 30) / copy_us * 1e6,
                copy_method="1 GiB device-to-device copy_: read bytes / time and "
                            "(read + written) / time")


# ---------------------------------------------------------------------------------------------
# 3. decode


def bench_decode(clock, bw, l2_bytes, out_path):
    op = torch.ops.ppcompile.sparse_ffn_triton
    records = []
    gen = torch.Generator().manual_seed(1)
    tau = torch.tensor(TAU, device="cuda")
    tau_all = torch.tensor(TAU_ALL, device="cuda")
    gpu = torch.cuda.get_device_name()
    compiled_dense = torch.compile(dense_ffn, dynamic=False)
    for d, d_ff in SHAPES:
        copies = copies_for(d, d_ff, l2_bytes)
        weights = Weights(d, d_ff, copies)
        for batch in BATCHES:
            x, _, _, _ = routed_inputs(d, weights.n_exp, batch, 1.0, 0, gen)
            dense_us = time_calls([lambda w=w: dense_ffn(x, *w) for w in weights.sets])
            inductor_us = time_calls([lambda w=w: compiled_dense(x, *w) for w in weights.sets])
            for fraction in FRACTIONS:
                x, routers, unions, kept = routed_inputs(d, weights.n_exp, batch, fraction,
                                                         copies, gen)
                t = tau_all if fraction == 1.0 else tau
                stats = new_stats()
                calls = [lambda w=w, r=r, t=t: op(x, w[1], None, w[0], None, w[2], None, *r, t,
                                                  stats, "silu", EXPERT_SIZE, "prunepath")
                         for w, r in zip(weights.sets, routers)]
                ours_us = time_calls(calls)
                stats.zero_()
                calls[0]()
                counts = stats.tolist()
                union = statistics.mean(unions)
                active_bytes = union * weights.bytes_per_copy()
                rec = dict(
                    shape=f"{d}x{d_ff}", batch=batch, active_fraction=fraction, dtype="bfloat16",
                    ours_us=ours_us, dense_us=dense_us, inductor_us=inductor_us,
                    floor_us=active_bytes / bw * 1e6, gpu=gpu, union_fraction=union,
                    pct_of_floor=100 * active_bytes / bw * 1e6 / ours_us,
                    floor_at_brief_bw_us=active_bytes / BRIEF_READ_BW * 1e6,
                    active_weight_bytes=active_bytes,
                    router_bytes=weights.n_exp * d * 2, weight_copies=copies,
                    kept_as_constructed=counts == [kept[0] * EXPERT_SIZE, float(batch)],
                    target_us=target_us(d, d_ff, batch, fraction, dense_us, active_bytes),
                )
                rec["meets_target"] = rec["target_us"] is not None and ours_us <= rec["target_us"]
                records.append(rec)
                clock.log(f"{d}x{d_ff} b{batch} f{fraction}: ours {ours_us:.1f} us, dense "
                          f"{dense_us:.1f}, inductor {inductor_us:.1f}, floor "
                          f"{rec['floor_us']:.1f} ({rec['pct_of_floor']:.0f}% of floor)"
                          + ("" if rec["kept_as_constructed"] else "  KEPT SET WRONG"))
        del weights
        torch.cuda.empty_cache()
        out_path.write_text(json.dumps(records, indent=1))  # what is done survives a timeout
    return records


def target_us(d, d_ff, batch, fraction, dense_us, active_bytes):
    """The targets of the kernel brief (None where it sets none)."""
    if batch == 8:
        return 1.2 * active_bytes / BRIEF_READ_BW * 1e6
    if fraction == 1.0 and d_ff in (11008, 14336):
        return 1.05 * dense_us
    if (d, d_ff) == (576, 1536) and fraction == 0.25:
        return 6.0
    if d_ff in (11008, 14336) and fraction in (0.25, 0.5):
        return active_bytes / BRIEF_READ_BW * 1e6 / 0.85
    return None


# ---------------------------------------------------------------------------------------------
# 4. per-kernel profile


def profile_kernels(clock, l2_bytes):
    from torch.profiler import ProfilerActivity, profile

    op = torch.ops.ppcompile.sparse_ffn_triton
    gen = torch.Generator().manual_seed(2)
    tau = torch.tensor(TAU, device="cuda")
    out = []
    for (d, d_ff), batch in [((4096, 14336), 1), ((4096, 14336), 8), ((576, 1536), 1)]:
        copies = min(8, copies_for(d, d_ff, l2_bytes))
        weights = Weights(d, d_ff, copies)
        x, routers, _, _ = routed_inputs(d, weights.n_exp, batch, 0.25, copies, gen)
        stats = new_stats()
        calls = [lambda w=w, r=r: op(x, w[1], None, w[0], None, w[2], None, *r, tau, stats,
                                     "silu", EXPERT_SIZE, "prunepath")
                 for w, r in zip(weights.sets, routers)]
        for c in calls:
            c()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                for c in calls:
                    c()
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.key_averages():
            total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if total and e.count:
                kernels[e.key] = dict(avg_us=total / e.count, count=e.count)
        out.append(dict(shape=f"{d}x{d_ff}", batch=batch, active_fraction=0.25,
                        kernels=kernels))
        clock.log(f"profile {d}x{d_ff} b{batch}: " + ", ".join(
            f"{k[:28]} {v['avg_us']:.1f} us" for k, v in kernels.items()))
        del weights
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------
# 6. plan sweep


# (shape, batch) -> (active fractions, plan changes); 0.0 keeps one expert (the fixed cost alone),
# 1.0 runs at tau = 1. Plan changes may also name `expert_size` (routers of d_ff / s experts on the
# same weights). Earlier sweeps and their answers: GPU_RUNS.md (run 6: single knobs at 25%; run
# 13: one program per SM; run 18: the one-token selection in its own kernel, 32-neuron experts;
# run 22: batch-8 neuron steps; run 23: the router split, selection warps; runs 25-26: the batch-8
# down kernel, the one-token router; run 30: the one-token up kernel; runs 32-33: expert sizes and
# where the 2048-wide selection of 8-neuron experts runs; runs 37-39, by benchmarks/ab_kernels.py:
# the pairwise selection). This one asks whether the one-token up kernel's plan (run 30: a local
# optimum while every program sorted) moves now that it no longer sorts past 512 experts.
E8 = dict(expert_size=8)
SWEEP = {
    ((4096, 14336), 1): ([0.25, 0.5], [{}, dict(up_sub=4), dict(up_sub=1), dict(up_warps=4),
                                       dict(up_programs_x=3), dict(up_programs_x=1), E8,
                                       dict(E8, up_sub=4), dict(E8, up_programs_x=3)]),
    ((4096, 11008), 1): ([0.25], [{}, dict(up_sub=4), dict(up_programs_x=3)]),
}


def sweep_error(tf, x, w, r, tau, s, config):
    """Relative error of one swept call against the torch reference (same weights, same dtype):
    a plan that times well must also compute the right thing (run 15 found one that did not)."""
    from ppcompile.kernels.reference import sparse_ffn_reference
    y = tf.sparse_ffn_triton(x, w[1], None, w[0], None, w[2], None, *r, tau, "silu", s,
                             config=config)[0].float()
    y_ref = sparse_ffn_reference(x, w[1], None, w[0], None, w[2], None, *r, tau, "silu", s)[0]
    return ((y - y_ref.float()).norm() / y_ref.float().norm()).item()


def sweep_plans(clock, l2_bytes):
    tau = torch.tensor(TAU, device="cuda")
    tau_all = torch.tensor(TAU_ALL, device="cuda")
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    out = []
    with direct_launches() as tf:
        for ((d, d_ff), batch), (fractions, configs) in SWEEP.items():
            copies = copies_for(d, d_ff, l2_bytes)
            weights = Weights(d, d_ff, copies)
            for fraction in fractions:
                for cfg in configs:
                    if clock.left() < 10:
                        clock.log("sweep: out of time budget, rest skipped")
                        return out
                    config = dict(cfg)
                    if "up_programs_x" in config:
                        config["up_programs"] = config.pop("up_programs_x") * n_sm
                    s = config.pop("expert_size", EXPERT_SIZE)
                    n_exp = d_ff // s
                    x, routers, _, _ = routed_inputs(d, n_exp, batch, fraction or 1 / n_exp,
                                                     copies, torch.Generator().manual_seed(3))
                    t = tau_all if fraction == 1.0 else tau
                    try:
                        us = time_calls([lambda w=w, r=r: tf.sparse_ffn_triton(
                            x, w[1], None, w[0], None, w[2], None, *r, t, "silu", s,
                            config=config) for w, r in zip(weights.sets, routers)])
                        err = sweep_error(tf, x, weights.sets[0], routers[0], t, s, config)
                    except Exception as e:  # a config the table would never pick may fail
                        us = err = None
                        clock.log(f"sweep {cfg}: {type(e).__name__}: {str(e)[:200]}")
                    full = tf.plan(batch, d, d, d_ff, s, n_sm, **config)
                    out.append(dict(shape=f"{d}x{d_ff}", batch=batch, active_fraction=fraction,
                                    change=cfg, ours_us=us, rel_err=err, plan=full.__dict__))
                    clock.log(f"sweep {d}x{d_ff} b{batch} f{fraction} {cfg or 'default'}: "
                              f"{'failed' if us is None else f'{us:.1f} us, rel err {err:.1e}'}")
            del weights
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------
# 5. many tokens


def bench_prefill(clock, l2_bytes):
    gen = torch.Generator().manual_seed(4)
    tau = torch.tensor(TAU, device="cuda")
    d, d_ff = PREFILL_SHAPE
    weights = Weights(d, d_ff, 3)
    out = []
    with direct_launches() as tf:
        for n in PREFILL_TOKENS:
            x, _, _, _ = routed_inputs(d, weights.n_exp, n, 1.0, 0, gen)
            dense_us = time_calls([lambda w=w: dense_ffn(x, *w) for w in weights.sets], reps=20)
            for fraction in (0.25, 1.0):
                if clock.left() < 30:
                    clock.log("prefill: out of time budget, rest skipped")
                    return out
                x, routers, unions, _ = routed_inputs(d, weights.n_exp, n, fraction, 3, gen)
                rec = dict(shape=f"{d}x{d_ff}", tokens=n, active_fraction=fraction,
                           union_fraction=statistics.mean(unions), dense_us=dense_us,
                           flops_dense=2 * n * 3 * d * d_ff)
                for kind in ("decode", "prefill"):
                    rec[f"ours_{kind}_us"] = time_calls([lambda w=w, r=r: tf.sparse_ffn_triton(
                        x, w[1], None, w[0], None, w[2], None, *r, tau, "silu", EXPERT_SIZE,
                        config=dict(kind=kind)) for w, r in zip(weights.sets, routers)], reps=20)
                out.append(rec)
                clock.log(f"prefill n={n} f{fraction} (union {rec['union_fraction']:.2f}): "
                          f"decode plan {rec['ours_decode_us']:.1f} us, prefill plan "
                          f"{rec['ours_prefill_us']:.1f} us, dense {dense_us:.1f} us")
    return out


# ---------------------------------------------------------------------------------------------


def print_tables(decode, prefill):
    try:
        from tabulate import tabulate
    except ImportError:
        def tabulate(rows, headers, **_):
            return "\n".join("  ".join(str(c) for c in r) for r in [headers, *rows])

    rows = [[r["shape"], r["batch"], r["active_fraction"], f"{r['union_fraction']:.2f}",
             f"{r['ours_us']:.1f}", f"{r['dense_us']:.1f}", f"{r['inductor_us']:.1f}",
             f"{r['floor_us']:.1f}", f"{r['pct_of_floor']:.0f}%",
             "" if r["target_us"] is None else f"{r['target_us']:.1f}",
             "" if r["target_us"] is None else ("yes" if r["meets_target"] else "NO"),
             "" if r["kept_as_constructed"] else "WRONG"] for r in decode]
    print(tabulate(rows, headers=["shape", "batch", "frac", "union", "ours us", "dense us",
                                  "inductor us", "floor us", "% floor", "target us", "meets",
                                  "kept"]))
    if prefill:
        rows = [[r["tokens"], r["active_fraction"], f"{r['union_fraction']:.2f}",
                 f"{r['ours_decode_us']:.1f}", f"{r['ours_prefill_us']:.1f}",
                 f"{r['dense_us']:.1f}", f"{r['flops_dense'] / r['dense_us'] / 1e6:.0f}"]
                for r in prefill]
        print(tabulate(rows, headers=["tokens", "frac", "union", "decode plan us",
                                      "prefill plan us", "dense us", "dense TFLOP/s"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="directory for the JSON results")
    ap.add_argument("--budget-s", type=float, default=420,
                    help="skip the remaining optional sections past this many seconds")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["decode", "profile", "prefill", "sweep"], help="sections not to run (numerics and bandwidth always run), for a short "
                    "call that checks one thing")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU and none is visible "
              "(torch.cuda.is_available() is False); nothing was measured.")
        sys.exit(2)
    from ppcompile.kernels import gpu_op

    if not gpu_op.AVAILABLE:
        print("benchmarks/kernels.py needs triton; it is not installed.")
        sys.exit(2)
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget_s)
    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 0) or 60e6
    clock.log(f"{props.name}, {props.multi_processor_count} SMs, L2 {l2_bytes / 1e6:.0f} MB, "
              f"torch {torch.__version__}, triton {__import__('triton').__version__}")

    numerics = check_numerics(clock)
    bw = measure_bandwidth()
    clock.log(f"read bandwidth {bw['read_bw'] / 1e12:.2f} TB/s ({bw['read_method']}); copy "
              f"{bw['copy_read_bw'] / 1e12:.2f} TB/s read, {bw['copy_total_bw'] / 1e12:.2f} TB/s "
              f"read+written")
    meta = dict(gpu=props.name, torch=torch.__version__, bandwidth=bw, numerics=numerics)
    (args.out / "kernels_meta.json").write_text(json.dumps(meta, indent=1))

    decode = [] if "decode" in args.skip else bench_decode(clock, bw["read_bw"], l2_bytes,
                                                           args.out / "kernels.json")

    sections = [("profile", "kernels_profile.json", profile_kernels, 40),
                ("prefill", "kernels_prefill.json", bench_prefill, 45),
                ("sweep", "kernels_sweep.json", sweep_plans, 60)]
    prefill = []
    for name, filename, fn, needs_s in sections:
        if name in args.skip:
            continue
        if clock.left() < needs_s:
            clock.log(f"{filename}: skipped, {clock.left():.0f}s of budget left")
            continue
        try:
            result = fn(clock, l2_bytes)
        except Exception as e:  # an optional section must not lose the results above
            clock.log(f"{filename}: failed with {type(e).__name__}: {e}")
            continue
        (args.out / filename).write_text(json.dumps(result, indent=1))
        if fn is bench_prefill:
            prefill = result
    print_tables(decode, prefill)
    failed = [r["check"] for r in numerics if not r["ok"]]
    print(f"numerics: {len(numerics) - len(failed)} PASS, {len(failed)} FAIL"
          + (f" ({', '.join(failed)})" if failed else ""))
    clock.log(f"done; results in {args.out}")


if __name__ == "__main__":
    main()
