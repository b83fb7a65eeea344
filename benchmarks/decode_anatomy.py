"""Where a decode step's GPU time goes, kernel by kernel (GPU experiment, one call, ~3 minutes).

    python benchmarks/decode_anatomy.py --out DIR

decode.py's GPU time per step (the summed kernel times of the step) is 5.38 ms dense and 5.61 ms
at tau = 1 for Llama-3-8B (run 45): 7 us per layer more, where the kernel table says the FFN op
costs 5 us more than cuBLAS. This script takes a Llama-3-8B-shaped model with fewer layers
(the per-layer kernels are the same), compiles it dense and with the backend, and profiles
generate() of 1 + STEPS tokens minus 1 token: per kernel name, calls and microseconds per decode
step, dense vs prunepath at tau = 1 and at the taus for 50% and 25% active. Numbers only: the
findings go to benchmarks/results/GPU_RUNS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppcompile  # noqa: E402
from ppcompile import bench  # noqa: E402

STEPS = 16


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.25])
    ap.add_argument("--expert-size", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    bench.configure_dynamo()
    model = bench.random_llama("llama3-8b", layers=args.layers)
    if hasattr(torch.profiler._utils, "_init_for_cuda_graphs"):
        torch.profiler._utils._init_for_cuda_graphs()
    prompt = torch.randint(0, 128256, (1, 128), device="cuda")
    decoder = bench.Decoder(model, 128, 1 + STEPS)
    decoder.cache(1)
    forward = model.forward
    tables = {}
    model.forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        decoder.generate(prompt, 1 + STEPS)
    tables["dense"] = decoder.step_kernels(prompt, STEPS)
    torch._dynamo.reset()
    calibration = torch.randint(0, 128256, (16, 128), device="cuda")
    model.forward = torch.compile(forward, backend="prunepath", options=dict(
        tau=1.0, calibration=calibration, expert_size=args.expert_size, calibration_tokens=2048,
        distill_epochs=0, cache=False))
    for target in args.fractions:
        tau = 1.0 if target >= 1.0 else bench.tau_for_fraction(decoder, prompt, target)[0]
        ppcompile.set_tau(model, tau)
        for _ in range(3):
            decoder.generate(prompt, 1 + STEPS)
        tables[f"prunepath {target}"] = decoder.step_kernels(prompt, STEPS)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_anatomy.json").write_text(json.dumps(dict(
        gpu=torch.cuda.get_device_name(), layers=args.layers, steps=STEPS,
        expert_size=args.expert_size, tables=tables), indent=1))
    for name, table in tables.items():
        total = sum(us for _, us in table.values())
        print(f"\n== {name}: {total:.1f} us of kernels per step ({args.layers} layers)")
        for key, (calls, us) in sorted(table.items(), key=lambda kv: -kv[1][1]):
            if us >= 0.5:
                print(f"{us:9.1f} us  {calls:5.1f} calls  {us / max(calls, 1e-9):8.2f} us/call  "
                      f"{key[:110]}")


if __name__ == "__main__":
    main()
