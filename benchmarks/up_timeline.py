"""Where the one-token up kernel's time goes: each program's clock at its phases, on the GPU.

    python benchmarks/up_timeline.py --out DIR

The kernel of `ppcompile/kernels/triton_ffn.py` is copied with clock reads inserted at its phase
boundaries (the copy lives in a temporary module; the product kernel is untouched), launched
through the normal launcher on the benchmark's weights (kernels.py: routed inputs, weight copies
larger than L2, the default plan), and every program writes its stamps:

  start      first instruction (%globaltimer, ns, comparable across SMs)
  select     tau, logits or bits loaded, selection done (fused)     } %clock64 durations,
  stage      slice found, expert ids staged, barrier passed         } per program, in us at
  stream     the last weight step done                               } the SM clock
  flush      partial y added into the accumulator (fused down)       }
  ticket     arrival ticket back                                     }
  end        last instruction (%globaltimer)

The table gives, per case, the spread of program starts (the launch ramp), each phase's median
and maximum over programs, the spread of program ends, and the kernel's span (first start to
last end) beside its bandwidth floor.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernels as kb  # noqa: E402

from ppcompile.kernels import triton_ffn  # noqa: E402

PHASES = ["select", "stage", "stream", "flush", "ticket", "end"]
SLOTS = 10  # start_gt, start_clk, 6 phase clocks, end_gt, smid

CLK = 'tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)'
GT = 'tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)'
SMID = 'tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)'

# (anchor in the kernel's source, lines inserted before it)
PATCHES = [
    ("    R_SPLIT: tl.constexpr,\n):", "    R_SPLIT: tl.constexpr, stamps_ptr,\n):"),
    ("    tok = tl.arange(0, BLOCK_N)\n",
     f"    _g0 = {GT}\n    _c0 = {CLK}\n    _c1 = _c0\n    _c2 = _c0\n    _c3 = _c0\n"
     "    _c4 = _c0\n    _c5 = _c0\n"),
    ("    # this program's compact neurons", f"    _c1 = {CLK}\n"),
    ("    kk = tl.arange(0, BLOCK_K)\n", f"    _c2 = {CLK}\n"),
    ("    if FUSE_DOWN:\n        out = ", f"    _c3 = {CLK}\n"),
    ("        # last program in:", f"        _c4 = {CLK}\n"),
    ("        if ticket == P - 1:\n", f"        _c5 = {CLK}\n"),
]
TAIL = f"""    _c6 = {CLK}
    _g6 = {GT}
    _base = stamps_ptr + (m * P + p) * {SLOTS}
    tl.store(_base + 0, _g0)
    tl.store(_base + 1, _c0)
    tl.store(_base + 2, _c1)
    tl.store(_base + 3, _c2)
    tl.store(_base + 4, _c3)
    tl.store(_base + 5, _c4)
    tl.store(_base + 6, _c5)
    tl.store(_base + 7, _c6)
    tl.store(_base + 8, _g6)
    tl.store(_base + 9, {SMID}.to(tl.int64))
"""

# (d, d_ff, tokens, expert size, active fractions)
CASES = [(4096, 14336, 1, 16, [0.25, 0.5, 1.0]), (4096, 14336, 1, 8, [0.25]),
         (4096, 11008, 1, 16, [0.25]), (2048, 8192, 1, 16, [0.25]), (576, 1536, 1, 16, [0.25, 1.0])]


def stamped_kernel(tmp: Path):
    """The up kernel with clock reads, from a module written to `tmp`."""
    src = inspect.getsource(triton_ffn._up_kernel.fn)  # with its @triton.jit
    for anchor, insert in PATCHES:
        assert src.count(anchor) == 1, f"anchor not found once: {anchor!r}"
        if anchor.startswith("    R_SPLIT"):
            src = src.replace(anchor, insert)
        else:
            src = src.replace(anchor, insert + anchor)
    src = src.rstrip("\n") + "\n" + TAIL
    path = tmp / "_stamped_up_kernel.py"
    path.write_text("import triton\nimport triton.language as tl\n"
                    "import ppcompile.kernels.triton_ffn as _base\n"
                    "globals().update({k: v for k, v in vars(_base).items() "
                    "if not k.startswith('__') and k != '_up_kernel'})\n\n" + src)
    sys.path.insert(0, str(tmp))
    return importlib.import_module("_stamped_up_kernel")._up_kernel


class Stamped:
    """Stands in for `_up_kernel` in the launcher: the same launch plus the stamps buffer."""

    def __init__(self, kernel):
        self.kernel, self.stamps = kernel, None

    def __getitem__(self, grid):
        n = grid[0] * grid[1] * SLOTS
        if self.stamps is None or self.stamps.numel() != n:
            self.stamps = torch.zeros(n, dtype=torch.int64, device="cuda")
        return lambda *a, **k: self.kernel[grid](*a, stamps_ptr=self.stamps, **k)


def summarize(stamps: torch.Tensor, clock_ghz: float) -> dict:
    s = stamps.view(-1, SLOTS).cpu().double()
    start, end = s[:, 0], s[:, 8]
    clk = s[:, 1:8]
    phases = (clk[:, 1:] - clk[:, :-1]) / (clock_ghz * 1e3)  # us
    out = dict(programs=s.shape[0], sms=int(s[:, 9].unique().numel()),
               start_spread_us=float(start.max() - start.min()) / 1e3,
               end_spread_us=float(end.max() - end.min()) / 1e3,
               span_us=float(end.max() - start.min()) / 1e3)
    for i, name in enumerate(PHASES):
        col = phases[:, i].tolist()
        out[f"{name}_median_us"] = statistics.median(col)
        out[f"{name}_max_us"] = max(col)
    out["program_median_us"] = statistics.median(((clk[:, -1] - clk[:, 0]) / (clock_ghz * 1e3)).tolist())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    clock_ghz = getattr(props, "clock_rate", 1_980_000) / 1e6  # kHz -> GHz
    l2 = getattr(props, "L2_cache_size", 0) or 60e6
    read_bw = kb.measure_bandwidth()["read_bw"]
    with tempfile.TemporaryDirectory() as tmp:
        stamped = Stamped(stamped_kernel(Path(tmp)))
        triton_ffn._up_kernel = stamped
        triton_ffn.wrap_triton = lambda kernel: kernel
        tau = torch.tensor(kb.TAU, device="cuda")
        tau_all = torch.tensor(kb.TAU_ALL, device="cuda")
        records = []
        for d, d_ff, batch, s, fractions in CASES:
            copies = kb.copies_for(d, d_ff, l2)
            weights = kb.Weights(d, d_ff, copies)
            for fraction in fractions:
                x, routers, _, kept = kb.routed_inputs(d, d_ff // s, batch, fraction, copies,
                                                       torch.Generator().manual_seed(3))
                t = tau_all if fraction == 1.0 else tau
                stats = kb.new_stats()
                calls = [lambda w=w, r=r: triton_ffn.sparse_ffn_triton(
                    x, w[1], None, w[0], None, w[2], None, *r, t, "silu", s, stats=stats)
                    for w, r in zip(weights.sets, routers)]
                rows = []
                for rep in range(5):  # the last call of each pass over the copies is read
                    for c in calls:
                        c()
                    torch.cuda.synchronize()
                    if rep >= 2:
                        rows.append(summarize(stamped.stamps, clock_ghz))
                rec = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                active_bytes = 3 * d * s * max(1, round(fraction * d_ff / s)) * 2
                rec.update(shape=f"{d}x{d_ff}", batch=batch, expert_size=s,
                           active_fraction=fraction, clock_ghz=clock_ghz,
                           floor_us=active_bytes / read_bw * 1e6, read_bw=read_bw,
                           gpu=torch.cuda.get_device_name())
                records.append(rec)
                print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v)
                                  for k, v in rec.items()}), flush=True)
            del weights
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "up_timeline.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
