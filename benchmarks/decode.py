"""End-to-end decoding on the GPU: generate() with a static KV cache, dense torch.compile
(Inductor, CUDA graphs) vs backend="prunepath" at 100%, 50% and 25% active FFN neurons, for
Llama-3.2-1B and Llama-3-8B shapes with random bf16 weights (real weights cannot reach the GPU
machine; the plan is calibrated on random tokens and tau is bisected to hit each fraction).

    python benchmarks/decode.py --models llama3-1b llama3-8b --out benchmarks/results/decode.json
    python benchmarks/decode.py --models smollm2-135m-shape --expert-size 8 --batches 1 --out ...

Method and the ideal speed-up: see ppcompile/bench.py. Prompt 128 tokens, 256 new tokens,
batch 1 and 8. Writes a list of records (model, batch, active_fraction, tokens_per_s,
dense_tokens_per_s, ideal_speedup, peak_mem_gb, dense_peak_mem_gb, gpu, and more) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppcompile import bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["llama3-1b", "llama3-8b"],
                    choices=list(bench.LLAMA_SHAPES),
                    help="smollm2-135m-shape too (random weights): launch-bound FFNs, on "
                    "the program-per-expert kernel")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--expert-size", type=int, default=16,
                    help="neurons per expert (the kernel table's 16; the plans' default is 8)")
    ap.add_argument("--host-profile", type=Path, default=None, metavar="DIR",
                    help="also write a cProfile of one generate() per record into DIR")
    ap.add_argument("--out", type=Path, required=True, help="JSON file for the records")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    bench.configure_dynamo()
    # the backend's pass and Inductor times, to see where compile time goes
    logging.basicConfig(format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ppcompile").setLevel(logging.INFO)
    records = []
    for name in args.models:
        model = bench.random_llama(name)
        done = list(records)

        def save(new):
            args.out.write_text(json.dumps(done + new, indent=1))

        args.out.parent.mkdir(parents=True, exist_ok=True)
        records += bench.run(model, name, args.batches, args.fractions, args.prompt_len,
                             args.new_tokens, expert_size=args.expert_size,
                             log=lambda m: print(m, flush=True), on_record=save,
                             host_profile_dir=args.host_profile)
        args.out.write_text(json.dumps(records, indent=1))
        del model
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    print(bench.table(records))


if __name__ == "__main__":
    main()
