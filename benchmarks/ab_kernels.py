"""A/B of the kernels against an earlier commit's, in one process on the same weights, timed as
kernels.py times (CUDA graph over weight copies larger than L2, median per call):

    python benchmarks/ab_kernels.py --prev 3d836a5 --out DIR [--cases NAME]   (CASE_SETS below)

The earlier `ppcompile/kernels/triton_ffn.py` is taken with `git show REV:...` (or, where --prev
names a file, that file: a saved copy of the kernels) into a module beside the current one
(removed afterwards). Each row is (shape, batch, expert size, active fraction, variant); variants
are the earlier default plan ("prev", or "prev NAME" per file when --prev names several), the
current default plan ("new") and plan overrides of the current code. Every timed call is also
checked: kept count as constructed, relative error against the torch reference.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernels as kb  # noqa: E402

from ppcompile.kernels import triton_ffn as new  # noqa: E402
from ppcompile.kernels.reference import sparse_ffn_reference  # noqa: E402

PREV_MODULE = "_ab_prev_triton_ffn"

# (d, d_ff, batch, expert size, active fractions (0.0: one expert), {variant: plan overrides})
CASES = [
    (4096, 14336, 1, 16, [0.0, 0.25, 0.5],
     {"fused": dict(select="fused"), "pairwise sel_e 16": dict(sel_e=16),
      "pairwise sel_e 2": dict(sel_e=2), "pairwise 8 warps": dict(sel_warps=8)}),
    (4096, 14336, 1, 8, [0.0, 0.25, 0.5], {"sel_e 16": dict(sel_e=16), "sel_e 1": dict(sel_e=1)}),
    (4096, 14336, 8, 16, [0.25, 1.0], {"pairwise sel_e 8": dict(select="pairwise", sel_e=8)}),
    (4096, 14336, 8, 8, [0.25], {"pairwise sel_e 4": dict(select="pairwise", sel_e=4)}),
    (4096, 11008, 1, 16, [0.25, 0.5], {"fused": dict(select="fused")}),
    (2048, 8192, 1, 16, [0.25, 0.5], {"pairwise": dict(select="pairwise")}),
    (576, 1536, 1, 16, [0.25], {"pairwise": dict(select="pairwise")}),
]

# the one-token router and selection kernels' knobs (a decode step's profile, run 51: the router
# kernel took 5.2 us and the pairwise selection 3.2 us per layer for a 7.3 MB router)
_ROUTER_KNOBS = {
    "router 2 warps": dict(router_warps=2), "router 8 warps": dict(router_warps=8),
    "router k1024": dict(router_block_k=1024),
    "router 2 rows k2048": dict(router_block_e=2, router_block_k=2048),
    "router 4 rows k1024": dict(router_block_e=4, router_block_k=1024),
    "router 4 rows k1024 8 warps": dict(router_block_e=4, router_block_k=1024, router_warps=8),
    "router 8 rows k512": dict(router_block_e=8, router_block_k=512),
    "sel_e 4": dict(sel_e=4), "sel_e 16": dict(sel_e=16), "sel 2 warps": dict(sel_warps=2),
    "sel 8 warps": dict(sel_warps=8),
}
ROUTER_CASES = [
    (4096, 14336, 1, 16, [0.25, 1.0], _ROUTER_KNOBS),
    (4096, 14336, 1, 8, [0.25], _ROUTER_KNOBS),
    (2048, 8192, 1, 16, [0.25], {k: v for k, v in _ROUTER_KNOBS.items() if "router" in k}),
]
# the default plans, previous kernels against current ones (runs 59-61: tau >= 1 in neuron space,
# expert ids fetched a step ahead)
DEFAULT_CASES = [
    (4096, 14336, 1, 16, [0.25, 0.5, 1.0], {}), (4096, 14336, 1, 8, [0.25], {}),
    (4096, 11008, 1, 16, [0.25, 0.5, 1.0], {}), (2048, 8192, 1, 16, [0.25, 1.0], {}),
    (576, 1536, 1, 16, [0.25, 1.0], {}), (4096, 14336, 8, 16, [0.25, 1.0], {}),
]
# the pairwise selection's list of kept experts (up_list) against the up kernel's own cumsum
# over the experts (GPU_RUNS.md, runs 91-94)
_LIST = {"list": dict(up_list=True), "no list": dict(up_list=False)}
LIST_CASES = [
    (4096, 14336, 1, 16, [0.25, 0.5], _LIST), (4096, 14336, 1, 8, [0.25, 0.5, 1.0], _LIST),
    (4096, 11008, 1, 8, [0.25, 0.5], _LIST), (4096, 11008, 1, 16, [0.25], _LIST),
]
# the one-token router with several expert rows per program over the whole of d in one step (x,
# read from L2 by every program, is as many bytes as the router itself; run 52's multi-row plans
# split d into steps). Run 100 (then named "x-once") also timed, as "new" against "prev", an up
# kernel that loaded x once instead of once per step (no gain, not kept)
def _router_rows(d):
    k = new._pow2(d)
    return {f"router {r} rows {w} warps": dict(router_block_e=r, router_block_k=k, router_warps=w)
            for r, w in ((2, 8), (4, 8), (4, 16), (8, 16))}


ROUTER_ROWS_CASES = [
    (4096, 14336, 1, 16, [0.25, 0.5, 1.0], _router_rows(4096)),
    (4096, 14336, 1, 8, [0.25, 0.5], _router_rows(4096)),
    (4096, 11008, 1, 16, [0.25], _router_rows(4096)),
    (2048, 8192, 1, 16, [0.25], _router_rows(2048)),
    (576, 1536, 1, 16, [0.25], _router_rows(576)),
]
# 1 / up_pool of the up kernel's steps claimed one at a time by programs done early, against
# equal shares only ("new"; "prev" checks that moving the step into a helper changed nothing)
# (run 101; run 102 with up_pool = 8 the one-token default: "no pool" is then the variant)
_POOL = {f"pool {k}": dict(up_pool=k) for k in (0, 4, 16)}
POOL_CASES = [
    (4096, 14336, 1, 16, [0.25, 0.5, 1.0], _POOL), (4096, 14336, 1, 8, [0.25, 0.5], _POOL),
    (4096, 11008, 1, 16, [0.25, 0.5, 1.0], _POOL), (2048, 8192, 1, 16, [0.25, 1.0], _POOL),
    (576, 1536, 1, 16, [0.25], {"pool 2": dict(up_pool=2), "pool 8": dict(up_pool=8)}),
    (4096, 14336, 2, 16, [0.25, 0.5], _POOL), (4096, 14336, 8, 16, [0.25], {}),
]
# launch-bound FFNs: a program per expert (up_by_expert, _expert_kernel) against the up kernel;
# 640x2048 is Gemma-3-270m's FFN, 960x2560 SmolLM2-360M's (run 106 tried one launch instead:
# slower; run 107 timed this kernel with its weight loads before the selection, run 110 after;
# one of the warp counts is the default: 4 for one token, 8 for two since run 110)
_BY = {"up kernel": dict(up_by_expert=False), "4 warps": dict(up_warps=4),
       "8 warps": dict(up_warps=8)}
BY_EXPERT_CASES = [
    (576, 1536, 1, 16, [0.25, 1.0], _BY), (576, 1536, 1, 8, [0.25, 0.5], _BY),
    (640, 2048, 1, 16, [0.25], _BY), (640, 2048, 1, 8, [0.25], _BY),
    (576, 1536, 2, 16, [0.25], _BY), (960, 2560, 1, 16, [0.25, 0.5], _BY),
]
CASE_SETS = {"selection": CASES, "router": ROUTER_CASES, "defaults": DEFAULT_CASES,
             "list": LIST_CASES, "router-rows": ROUTER_ROWS_CASES, "pool": POOL_CASES,
             "by-expert": BY_EXPERT_CASES}


def load_prev(rev: str, index: int = 0):
    if Path(rev).is_file():
        src = Path(rev).read_text()
    else:
        src = subprocess.run(["git", "show", f"{rev}:ppcompile/kernels/triton_ffn.py"],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout
    module = f"{PREV_MODULE}{index}"
    path = ROOT / "ppcompile" / "kernels" / f"{module}.py"
    path.write_text(src)
    try:
        return importlib.import_module(f"ppcompile.kernels.{module}")
    finally:
        path.unlink()


def _takes_stats(mod) -> bool:
    return "stats" in inspect.signature(mod.sparse_ffn_triton).parameters


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prev", required=True, nargs="+",
                    help="git revisions of the earlier kernels, or files holding them")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--cases", choices=list(CASE_SETS), default="selection")
    args = ap.parse_args()
    prevs = [("prev" if len(args.prev) == 1 else f"prev {Path(rev).stem}", load_prev(rev, i))
             for i, rev in enumerate(args.prev)]
    for m in [new] + [mod for _, mod in prevs]:
        m.wrap_triton = lambda kernel: kernel  # launch directly, plan overrides allowed
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 60e6
    tau = torch.tensor(kb.TAU, device="cuda")
    tau_all = torch.tensor(kb.TAU_ALL, device="cuda")
    out = []
    for d, d_ff, batch, s, fractions, overrides in CASE_SETS[args.cases]:
        copies = kb.copies_for(d, d_ff, l2)
        weights = kb.Weights(d, d_ff, copies)
        variants = [(label, mod, {}) for label, mod in prevs] + [("new", new, {})] + [
            (name, new, cfg) for name, cfg in overrides.items()]
        for fraction in fractions:
            x, routers, _, kept = kb.routed_inputs(d, d_ff // s, batch, fraction or s / d_ff,
                                                   copies, torch.Generator().manual_seed(3))
            t = tau_all if fraction == 1.0 else tau
            for label, mod, config in variants:
                # the statistics buffer the op adds into, for kernels that take one (a fresh
                # one per call would time a memset too)
                stats = dict(stats=kb.new_stats()) if _takes_stats(mod) else {}
                calls = [lambda w=w, r=r, mod=mod, config=config, stats=stats:
                         mod.sparse_ffn_triton(x, w[1], None, w[0], None, w[2], None, *r, t,
                                               "silu", s, config=config, **stats)
                         for w, r in zip(weights.sets, routers)]
                try:
                    us = kb.time_calls(calls)
                    if stats:
                        stats["stats"].zero_()
                    y, counts = calls[0]()
                    w, r = weights.sets[0], routers[0]
                    y_ref = sparse_ffn_reference(x, w[1], None, w[0], None, w[2], None, *r, t,
                                                 "silu", s)[0].float()
                    err = ((y.float() - y_ref).norm() / y_ref.norm()).item()
                    kept_ok = fraction == 1.0 or counts[0].item() == kept[0] * s
                except Exception as e:  # a variant the table would never pick may fail
                    us, err, kept_ok = None, None, False
                    print(f"{label}: {type(e).__name__}: {str(e)[:300]}")
                out.append(dict(shape=f"{d}x{d_ff}", batch=batch, expert_size=s,
                                active_fraction=fraction, variant=label, config=config, us=us,
                                kept_ok=kept_ok, rel_err=err, gpu=torch.cuda.get_device_name()))
                print(f"{d}x{d_ff} b{batch} s{s} f{fraction} {label:20s} "
                      f"{'failed' if us is None else f'{us:7.1f} us'} kept_ok={kept_ok} "
                      f"err={'-' if err is None else f'{err:.1e}'}", flush=True)
        del weights
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ab_kernels.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
