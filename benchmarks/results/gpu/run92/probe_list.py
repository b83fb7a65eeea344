"""Ad-hoc (run 92): per-kernel GPU times of the one-token op, up_list on and off."""
import sys, json
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks")
import kernels as kb
from ppcompile.kernels import triton_ffn as t
t.wrap_triton = lambda k: k
out = []
for d, d_ff, s in [(4096, 14336, 16), (4096, 14336, 8)]:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copies = kb.copies_for(d, d_ff, l2)
    W = kb.Weights(d, d_ff, copies)
    for frac in (0.25, 1.0):
        x, routers, _, kept = kb.routed_inputs(d, d_ff // s, 1, frac, copies, torch.Generator().manual_seed(3))
        tau = torch.tensor(kb.TAU_ALL if frac == 1.0 else kb.TAU, device="cuda")
        for lst in (False, True):
            stats = kb.new_stats()
            def call(i):
                w, r = W.sets[i % copies], routers[i % copies]
                return t.sparse_ffn_triton(x, w[1], None, w[0], None, w[2], None, *r, tau, "silu", s,
                                           config=dict(up_list=lst), stats=stats)
            for i in range(10): call(i)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for i in range(60): call(i)
                torch.cuda.synchronize()
            per = {}
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    per.setdefault(e.name, []).append(e.device_time)
            row = {k: sorted(v)[len(v) // 2] for k, v in per.items()}
            print(f"{d}x{d_ff} s{s} f{frac} list={lst}:", {k[:30]: round(v, 2) for k, v in row.items()}, flush=True)
            out.append(dict(shape=f"{d}x{d_ff}", s=s, frac=frac, up_list=lst, kernels_us=row))
    del W
    torch.cuda.empty_cache()
Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
Path(sys.argv[1], "probe_list.json").write_text(json.dumps(out, indent=1))
