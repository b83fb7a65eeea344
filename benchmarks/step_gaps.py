"""Where a decode step's wall time goes besides its kernels (GPU experiment, one call, ~5 min).

    python benchmarks/step_gaps.py --out DIR [--model llama3-1b] [--batch 1]

decode.py measured prunepath at tau = 1 (the dense graph) at 0.89x dense tokens/s on an H100
with the same GPU kernel time (Llama-3.2-1B, batch 1). Per decode step this prints, for dense
torch.compile, prunepath at tau = 1 and dense again after prunepath has permuted and re-laid out
the weights: the wall time, the summed kernel time, the GPU's idle time between the step's first
and last kernel (torch.profiler's kernel intervals), the kernel count and the GPU memory copies.
Numbers only: the findings go to benchmarks/results/GPU_RUNS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppcompile import bench  # noqa: E402

STEPS = 32


def gpu_activity(decoder, prompt, new_tokens):
    """(kernels, summed kernel us, idle us inside the busy span, memcpy/memset count) of one
    generate() of new_tokens tokens."""
    spans, copies = [], 0
    for e in decoder.profiled(prompt, new_tokens).events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if "memcpy" in e.name.lower() or "memset" in e.name.lower():
            copies += 1
        spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
    busy, idle, end = 0.0, 0.0, None
    for s, t in spans:
        if end is not None and s > end:
            idle += s - end
        busy += t - s
        end = t if end is None else max(end, t)
    return len(spans), busy, idle, copies


def per_step(decoder, prompt):
    long = gpu_activity(decoder, prompt, 1 + STEPS)
    short = gpu_activity(decoder, prompt, 1)
    names = ("kernels", "kernel_us", "idle_us", "copies")
    return {n: round((a - b) / STEPS, 2) for n, a, b in zip(names, long, short)}


def measure(decoder, prompt, name, log):
    wall = decoder.measure(prompt)
    for _ in range(2):
        decoder.generate(prompt, 1 + STEPS)
    row = dict(name=name, step_ms=round(wall["step_ms"], 4),
               gpu_step_ms=wall["gpu_step_ms"], **per_step(decoder, prompt))
    log(json.dumps(row))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-1b", choices=list(bench.LLAMA_SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--expert-size", type=int, default=16)
    ap.add_argument("--reset-cudagraphs", action="store_true",
                    help="also drop Inductor's CUDA-graph trees between the compiles")
    ap.add_argument("--dense-twice", action="store_true",
                    help="compile and measure dense twice before prunepath (is a second compile "
                         "in the same process slower by itself?)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    bench.configure_dynamo()
    model = bench.random_llama(args.model)
    if hasattr(torch.profiler._utils, "_init_for_cuda_graphs"):
        torch.profiler._utils._init_for_cuda_graphs()
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, 128), device="cuda")
    decoder = bench.Decoder(model, 128, 64)
    decoder.cache(args.batch)
    forward = model.forward
    rows = []

    def log(line):
        print(line, flush=True)

    def reset():
        torch._dynamo.reset()
        if args.reset_cudagraphs:
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees
            reset_cudagraph_trees()

    model.forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
    rows.append(measure(decoder, prompt, "dense", log))
    reset()
    if args.dense_twice:
        model.forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
        rows.append(measure(decoder, prompt, "dense, second compile", log))
        reset()
    calibration = torch.randint(0, model.config.vocab_size, (16, 128), device="cuda")
    model.forward = torch.compile(forward, backend="prunepath", options=dict(
        tau=1.0, calibration=calibration, expert_size=args.expert_size, calibration_tokens=2048,
        distill_epochs=0, cache=False))
    rows.append(measure(decoder, prompt, "prunepath tau=1", log))
    layouts = sorted({(tuple(p.shape), p.stride()) for n, p in model.named_parameters()
                      if "down_proj" in n})
    log(f"down_proj layouts after prunepath: {layouts}")
    reset()
    model.forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
    rows.append(measure(decoder, prompt, "dense, weights as prunepath left them", log))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_gaps.json").write_text(json.dumps(dict(
        gpu=torch.cuda.get_device_name(), model=args.model, batch=args.batch, steps=STEPS,
        reset_cudagraphs=args.reset_cudagraphs, dense_twice=args.dense_twice,
        rows=rows), indent=1))


if __name__ == "__main__":
    main()
