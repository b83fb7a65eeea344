"""Quality benchmark: what FFN sparsity costs on real models, for every expert-selection method.

    python benchmarks/quality.py --out benchmarks/results

For each model (smollm2-135m, gemma3-270m: perplexity; minilm-l6: cosine of mean-pooled sentence
embeddings to the dense model's), calibrate once on calibration/text/wikitext2_calib.txt (second
half of the WikiText-2 raw test split) and evaluate on disjoint held-out text,
calibration/text/wikitext2_heldout.txt (its first half). Every method ("prunepath", "topk",
"static", "oracle") compiles the same model object with backend="prunepath" after
torch._dynamo.reset(), so all share the one plan made by the first compile; tau is swept with
ppcompile.set_tau (no recompilation). For prunepath/oracle tau is the probability-mass threshold,
for topk/static the fraction of experts kept. Methods are compared at matched active fractions
(0.5 .. 0.9) by interpolating each method's curve (perplexity in log space).

Writes <out>/quality.json, quality.md (command, tables, target checks) and quality.png.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from tabulate import tabulate

import ppcompile
from ppcompile import evaluate, models
from ppcompile.ffn import SparseFFN
from ppcompile.options import Options
from ppcompile.passes.calibrate import cpu_multiplies_bf16

DEFAULTS = Options()
ROOT = Path(__file__).resolve().parent.parent
CALIB_TEXT = ROOT / "calibration" / "text" / "wikitext2_calib.txt"
EVAL_TEXT = ROOT / "calibration" / "text" / "wikitext2_heldout.txt"

METHODS = ("prunepath", "topk", "static", "oracle")
MASS_TAUS = (1.0, 0.99, 0.97, 0.95, 0.92, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3)
FRACTION_TAUS = (1.0, 0.9, 0.8, 0.75, 0.7, 0.6, 0.5)
MATCHED = (0.5, 0.6, 0.7, 0.8, 0.9)
CALIBRATED = re.compile(r"ppcompile: calibrated .* in ([0-9.]+) s")
PASS_TIME = re.compile(r"pass (\w+): ([0-9.]+) s")
# the passes that make a plan: calibration and router training in the words
PLAN_PASSES = ("calibrate", "build_experts", "train_routers", "distill_routers",
               "choose_temperature")


@dataclass(frozen=True)
class Setup:
    """How one model is measured: window length, batch (one fixed shape), default sizes."""

    seq_len: int
    batch_size: int
    eval_windows: int
    calib_windows: int
    causal: bool = True


# SmolLM2 calibrates on 72 windows: its router distillation trains on every calibration batch
# but the held-out first, and fresh batches are what still pays (router_ablation.md, J and K:
# 2.42 -> 2.19 -> 2.11 at 50% active with 3 -> 4 -> 8 training batches); the plan passes' bf16
# sparse runs (K) made 8 of them cost less plan time (145 s) than 4 did before (164 s), on a
# Sapphire Rapids machine; 171-186 s on the 2-core EPYC machines (router_ablation.md Q)
SETUPS = {
    "smollm2-135m": Setup(seq_len=256, batch_size=8, eval_windows=32, calib_windows=72),
    "gemma3-270m": Setup(seq_len=256, batch_size=4, eval_windows=12, calib_windows=32),
    "minilm-l6": Setup(seq_len=128, batch_size=8, eval_windows=32, calib_windows=64, causal=False),
}


class StderrLog:
    """Tee of sys.stderr that keeps what was written (to read the backend's calibration line)."""

    def __init__(self, stream):
        self.stream, self.text = stream, []

    def write(self, s):
        self.text.append(s)
        return self.stream.write(s)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class PassTimes(logging.Handler):
    """Collects the backend's "pass NAME: T s" lines (logger "ppcompile", INFO)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds = {}

    def emit(self, record):
        match = PASS_TIME.fullmatch(record.getMessage())
        if match:
            name = match.group(1)
            self.seconds[name] = round(self.seconds.get(name, 0.0) + float(match.group(2)), 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="evaluation windows per model (default: per model, see SETUPS)")
    parser.add_argument("--calib-windows", type=int, default=None,
                        help="calibration windows per model (default: per model, see SETUPS)")
    parser.add_argument("--distill-epochs", type=int, default=None,
                        help="the backend's distill_epochs option (default: the backend's)")
    parser.add_argument("--expert-size", type=int, default=None,
                        help="the backend's expert_size option (default: the backend's)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="methods to measure; prunepath first (it makes the plan); fewer "
                             "for screening (comparisons with the others then read N/A)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.methods[0] != "prunepath":
        parser.error("--methods: prunepath must come first (its compile makes the plan)")
    if importlib.util.find_spec("matplotlib") is None:  # the plot comes last: fail before the run
        parser.error('the plot needs matplotlib: pip install -e ".[bench]"')
    torch.set_num_threads(2)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    results = dict(command=" ".join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
                   environment=environment(), expert_size=args.expert_size or DEFAULTS.expert_size,
                   models={}, records=[], matched=[])
    for name in args.models:
        summary, records = run_model(name, args)
        matched = matched_rows(name, records, summary["metric"])
        results["models"][name] = summary
        results["records"] += records
        results["matched"] += matched
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    results["targets"] = target_checks(results)

    (args.out / "quality.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = write_markdown(results)
    (args.out / "quality.md").write_text(markdown)
    plot(results, args.out / "quality.png")
    print(markdown)
    return 0


def run_model(name, args):
    setup = SETUPS[name]
    eval_windows = args.eval_windows or setup.eval_windows
    calib_windows = args.calib_windows or setup.calib_windows
    log(f"== {name}: loading")
    model, tokenizer = models.load(name)
    # Gemma needs BOS first; MiniLM's embeddings are made with [CLS] first.
    bos = evaluate.bos_for(model, tokenizer) if setup.causal else tokenizer.cls_token_id
    calib = evaluate.token_windows(tokenizer, CALIB_TEXT.read_text(encoding="utf-8"),
                                   setup.seq_len, calib_windows, bos)
    evals = evaluate.token_windows(tokenizer, EVAL_TEXT.read_text(encoding="utf-8"),
                                   setup.seq_len, eval_windows, bos)
    metric = "perplexity" if setup.causal else "cosine"
    batch_size = min(setup.batch_size, len(evals), len(calib))  # one shape, whole batches
    dense_model = model

    def measure(compiled):
        if setup.causal:
            return evaluate.perplexity(compiled, evals, batch_size)
        return evaluate.embedding_cosine(dense_model, compiled, evals, batch_size)

    t = time.perf_counter()
    dense = evaluate.perplexity(model, evals, batch_size) if setup.causal else 1.0
    dense_seconds = time.perf_counter() - t
    log(f"{name}: dense {metric} {dense:.4f} ({dense_seconds:.1f} s per evaluation)")

    summary = dict(metric=metric, dense=dense, seq_len=setup.seq_len, batch_size=batch_size,
                   eval_windows=len(evals), eval_tokens=evals.numel(),
                   # perplexity scores each window's tokens after its first
                   scored_tokens=(evals.shape[0] * (evals.shape[1] - 1)) if setup.causal else None,
                   calib_windows=len(calib), calib_tokens=calib.numel(),
                   dense_eval_seconds=round(dense_seconds, 1), compiles={})
    records, calibration_lines = [], []
    for method in args.methods:
        torch._dynamo.reset()
        options = {"tau": 1.0, "calibration": calib, "method": method, "cache": False}
        if args.distill_epochs is not None:
            options["distill_epochs"] = args.distill_epochs
        if args.expert_size is not None:
            options["expert_size"] = args.expert_size
        stderr = StderrLog(sys.stderr)
        sys.stderr = stderr
        passes, logger = PassTimes(), logging.getLogger("ppcompile")
        level = logger.level
        logger.addHandler(passes)
        logger.setLevel(logging.INFO)
        try:
            t = time.perf_counter()
            compiled = torch.compile(model, backend="prunepath", options=options)
            first = evals[:batch_size]
            if setup.causal:
                evaluate.perplexity(compiled, first, batch_size)
            else:
                evaluate.embedding_cosine(dense_model, compiled, first, batch_size)
            first_call = time.perf_counter() - t
        finally:
            sys.stderr = stderr.stream
            logger.removeHandler(passes)
            logger.setLevel(level)
        lines = [m.group(1) for m in CALIBRATED.finditer("".join(stderr.text))]
        calibration_lines += lines
        summary["compiles"][method] = dict(first_compile_call_seconds=round(first_call, 1),
                                           calibration_seconds=[float(s) for s in lines],
                                           pass_seconds=passes.seconds)
        log(f"{name} {method}: first compile + call {first_call:.1f} s, "
            f"calibration messages: {len(lines)}")

        taus = MASS_TAUS if method in ("prunepath", "oracle") else FRACTION_TAUS
        for tau in taus:
            ppcompile.set_tau(compiled, tau)
            t = time.perf_counter()
            value = measure(compiled)
            seconds = time.perf_counter() - t
            active = ppcompile.report(compiled).active_fraction
            records.append(dict(model=name, method=method, tau=tau, active_fraction=active,
                                **{metric: value},
                                ratio_to_dense=value / dense if setup.causal else None,
                                eval_seconds=round(seconds, 1)))
            log(f"{name} {method} tau={tau}: active {active:.3f}, {metric} {value:.4f} "
                f"[{seconds:.1f} s]")
            if active < MATCHED[0] - 0.02:  # the curve now reaches below the smallest match
                break
        if method == "prunepath":
            # at tau = 1 the backend runs the dense graph; the sparse one, forced, must agree
            ppcompile.set_tau(compiled, 1.0)
            with mock.patch.object(SparseFFN, "keeps_all", property(lambda self: False)):
                summary["tau_one_sparse_graph"] = measure(compiled)
            log(f"{name} prunepath tau=1 on the sparse graph: {metric} "
                f"{summary['tau_one_sparse_graph']:.4f}")
    summary["ffns"] = len(ppcompile.report(compiled).rows)
    summary["calibration_messages"] = len(calibration_lines)
    summary["calibration_seconds"] = float(calibration_lines[0]) if calibration_lines else None
    summary["first_compile_call_seconds"] = summary["compiles"]["prunepath"][
        "first_compile_call_seconds"]
    pass_seconds = summary["compiles"]["prunepath"]["pass_seconds"]
    summary["plan_seconds"] = round(sum(pass_seconds.get(p, 0.0) for p in PLAN_PASSES), 1)
    del model, compiled
    torch._dynamo.reset()
    return summary, records


def at_fraction(records, method, metric, fraction):
    """A method's metric interpolated at an active fraction from its measured points (None
    outside their range); perplexity in log space, cosine linearly."""
    points = sorted((r["active_fraction"], r[metric]) for r in records if r["method"] == method)
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    if not len(xs) or not xs[0] - 1e-9 <= fraction <= xs[-1] + 1e-9:
        return None
    if metric == "perplexity":
        return float(np.exp(np.interp(fraction, xs, np.log(ys))))
    return float(np.interp(fraction, xs, ys))


def matched_rows(name, records, metric):
    """Each method's metric at the MATCHED active fractions (at_fraction)."""
    return [dict(model=name, active_fraction=fraction,
                 **{method: at_fraction(records, method, metric, fraction) for method in METHODS})
            for fraction in MATCHED]


def target_checks(results):
    """The issue's targets, measured: list of dicts (target, measured, verdict)."""
    checks = []

    def check(target, measured, ok):
        verdict = "N/A" if ok is None else ("PASS" if ok else "FAIL")
        checks.append(dict(target=target, measured=measured, verdict=verdict))

    for name, summary in results["models"].items():
        records = [r for r in results["records"] if r["model"] == name]
        sparse_one = summary.get("tau_one_sparse_graph")  # runs before this check existed lack it
        if summary["metric"] == "perplexity":
            at_one = next(r for r in records if r["method"] == "prunepath" and r["tau"] == 1.0)
            error = abs(at_one["ratio_to_dense"] - 1)
            check(f"{name}: tau=1.0 perplexity equals dense within 0.1%",
                  f"{at_one['perplexity']:.4f} vs dense {summary['dense']:.4f} "
                  f"({100 * error:.4f}%), active fraction {at_one['active_fraction']:.3f}",
                  error <= 1e-3)
            if sparse_one is not None:
                error = abs(sparse_one / summary["dense"] - 1)
                check(f"{name}: tau=1.0 on the sparse graph (routers, selection, kept experts) "
                      "equals dense within 0.1%", f"{sparse_one:.4f} ({100 * error:.4f}%)",
                      error <= 1e-3)
        else:
            at_one = next(r for r in records if r["method"] == "prunepath" and r["tau"] == 1.0)
            check(f"{name}: tau=1.0 embeddings equal dense (cosine >= 0.99999)",
                  f"cosine {at_one['cosine']:.7f}", at_one["cosine"] >= 0.99999)
            if sparse_one is not None:
                check(f"{name}: tau=1.0 on the sparse graph equals dense (cosine >= 0.99999)",
                      f"cosine {sparse_one:.7f}", sparse_one >= 0.99999)
        matched = {m["active_fraction"]: m for m in results["matched"] if m["model"] == name}
        better = (lambda a, b: a < b) if summary["metric"] == "perplexity" else (
            lambda a, b: a > b)
        losses, missing = [], []
        for fraction, row in matched.items():
            for other in ("topk", "static"):
                if row["prunepath"] is None or row[other] is None:
                    missing.append(f"{other}@{fraction}")
                elif not better(row["prunepath"], row[other]):
                    losses.append(f"{other}@{fraction}")
        check(f"{name}: prunepath beats topk and static at every matched fraction 0.5..0.9",
              ("loses to " + ", ".join(losses) if losses else "wins everywhere compared")
              + (f"; not covered: {', '.join(missing)}" if missing else ""),
              None if missing and not losses else not losses)

    if "smollm2-135m" in results["models"]:
        summary = results["models"]["smollm2-135m"]
        matched = {m["active_fraction"]: m["prunepath"] for m in results["matched"]
                   if m["model"] == "smollm2-135m"}
        ratio = {f: None if p is None else p / summary["dense"] for f, p in matched.items()}
        check("smollm2-135m: ratio to dense at 50% active <= 1.8", fmt(ratio[0.5]),
              None if ratio[0.5] is None else ratio[0.5] <= 1.8)
        smol = [r for r in results["records"] if r["model"] == "smollm2-135m"]
        at_75 = at_fraction(smol, "prunepath", "perplexity", 0.75)  # from the measured points
        at_75 = None if at_75 is None else at_75 / summary["dense"]
        check("smollm2-135m: ratio to dense at 75-80% active <= 1.15 (checked at 75%, the "
              "harder end)", f"{fmt(at_75)} at 75%, {fmt(ratio[0.8])} at 80%",
              None if at_75 is None else at_75 <= 1.15)
        first, plan = summary["first_compile_call_seconds"], summary["plan_seconds"]
        times = summary["compiles"]["prunepath"]["pass_seconds"]
        check("smollm2-135m: calibration + router training under 3 minutes (2-core CPU)",
              f"{plan} s in the passes that make the plan ("
              + ", ".join(f"{p} {times.get(p, 0.0):.1f}" for p in PLAN_PASSES)
              + f"); whole first compile + call (those, Inductor, one batch) {first} s",
              plan < 180)
    for name, summary in results["models"].items():
        check(f"{name}: one plan shared by all methods (calibration message printed once)",
              f"{summary['calibration_messages']} calibration message(s) over "
              f"{len(summary['compiles'])} compiles", summary["calibration_messages"] == 1)
    return checks


def write_markdown(results) -> str:
    out = ["# Quality benchmark: sparse FFNs on real models", "",
           "Command (from the repository root):", "", "```", results["command"], "```", "",
           f"Environment: {results['environment']}. Whole run: {results['wall_seconds']} s.", "",
           f"Calibration text: `{CALIB_TEXT.relative_to(ROOT)}` (second half of the WikiText-2 "
           f"raw test split); evaluation text: `{EVAL_TEXT.relative_to(ROOT)}` (its first half, "
           f"disjoint). Expert size {results['expert_size']}, calibration tokens per FFN "
           f"{DEFAULTS.calibration_tokens}, float32, CPU. Active fraction: share "
           "of FFN neurons "
           "computed, token-weighted, mean over FFNs (`ppcompile.report(...).active_fraction`). "
           "For prunepath/oracle tau is the probability-mass threshold, for topk/static the "
           "fraction of experts kept. Matched fractions interpolate each method's measured "
           "curve (perplexity in log space, cosine linearly); '-' = outside its measured range.",
           "", "## Targets", ""]
    out += [tabulate([[c["verdict"], c["target"], c["measured"]] for c in results["targets"]],
                     headers=["", "target", "measured"], tablefmt="github"), "",
            "## Notes", "", *[f"- {note}" for note in notes(results)], ""]
    for name, summary in results["models"].items():
        metric = summary["metric"]
        out += [f"## {name}", "",
                f"{summary['ffns']} FFNs; evaluation {summary['eval_windows']} x "
                f"{summary['seq_len']} tokens ({summary['eval_tokens']}), calibration "
                f"{summary['calib_windows']} x {summary['seq_len']} tokens "
                f"({summary['calib_tokens']}); batch {summary['batch_size']}. "
                + (f"Dense perplexity {summary['dense']:.4f}. " if metric == "perplexity" else
                   "Metric: mean cosine of mean-pooled last hidden states to the dense model's "
                   "(windows start with [CLS]). ")
                + f"Calibration line: {fmt(summary['calibration_seconds'], '.1f')} s; first "
                f"compile + call per method: " + ", ".join(
                    f"{m} {c['first_compile_call_seconds']} s" for m, c in
                    summary["compiles"].items()) + ".", ""]
        rows = [m for m in results["matched"] if m["model"] == name]
        if metric == "perplexity":
            table = [[r["active_fraction"],
                      *[fmt(r[m] and r[m] / summary["dense"]) for m in METHODS],
                      fmt(r["prunepath"] and r["oracle"] and r["prunepath"] / r["oracle"])]
                     for r in rows]
            headers = ["active fraction", *[f"{m} ratio" for m in METHODS],
                       "prunepath / oracle"]
        else:
            table = [[r["active_fraction"], *[fmt(r[m], ".5f") for m in METHODS],
                      fmt(r["prunepath"] and r["oracle"] and r["oracle"] - r["prunepath"],
                          ".5f")] for r in rows]
            headers = ["active fraction", *[f"{m} cosine" for m in METHODS],
                       "oracle - prunepath"]
        out += ["At matched active fractions:", "",
                tabulate(table, headers=headers, tablefmt="github"), ""]
        records = [r for r in results["records"] if r["model"] == name]
        mass = [r for r in records if r["method"] in ("prunepath", "oracle")]
        taus = sorted({r["tau"] for r in mass}, reverse=True)
        by = {(r["method"], r["tau"]): r for r in mass}
        table = []
        for tau in taus:
            p, o = by.get(("prunepath", tau)), by.get(("oracle", tau))
            table.append([tau, fmt(p and p["active_fraction"]), fmt(p and p[metric], ".4f"),
                          fmt(p and p["ratio_to_dense"]), fmt(o and o["active_fraction"]),
                          fmt(o and o[metric], ".4f"), fmt(o and o["ratio_to_dense"])])
        out += ["Router vs oracle at each tau (same model-wide tau: prunepath runs each FFN at "
                "the threshold its layer budget gives for it, the oracle at tau itself; the "
                "router's gap is both in active fraction and in quality):", "",
                tabulate(table, headers=["tau", "prunepath active", f"prunepath {metric}",
                                         "ratio", "oracle active", f"oracle {metric}", "ratio"],
                         tablefmt="github"), ""]
        table = [[r["method"], r["tau"], fmt(r["active_fraction"]), fmt(r[metric], ".4f"),
                  fmt(r["ratio_to_dense"]), r["eval_seconds"]] for r in records]
        out += ["All measurements:", "",
                tabulate(table, headers=["method", "tau", "active fraction", metric,
                                         "ratio to dense", "eval s"], tablefmt="github"), ""]
    return "\n".join(out)


def notes(results) -> list[str]:
    """Observations computed from the measurements, for reading the tables."""
    lines = ["Plan sharing: each model was compiled once per method on the same module object "
             "(torch._dynamo.reset() in between, option cache=False); the backend printed its "
             "calibration line once per model, so topk, static and oracle ran on the plan made "
             "by the first (prunepath) compile.",
             "The calibration line times only the calibration forward passes; the plan time is "
             "the sum of the passes that make the plan (calibrate, build_experts, train_routers, "
             "distill_routers, choose_temperature: the backend's own timings); the first "
             "compile + call adds the "
             "other passes, Inductor's compile and one evaluation batch."]
    for name, summary in results["models"].items():
        rows = [m for m in results["matched"] if m["model"] == name]
        lower_better = summary["metric"] == "perplexity"

        def relative(a, b):
            return a / b if lower_better else (1 - a) / max(1 - b, 1e-12)

        versus = [(r["active_fraction"], relative(r["prunepath"], r["topk"])) for r in rows
                  if r["prunepath"] is not None and r["topk"] is not None]
        gap = [(r["active_fraction"], relative(r["prunepath"], r["oracle"])) for r in rows
               if r["prunepath"] is not None and r["oracle"] is not None]
        what = "perplexity" if lower_better else "embedding error (1 - cosine)"
        lines.append(
            f"{name}: prunepath's {what} relative to topk at matched fractions: "
            + ", ".join(f"{v:.3f} @ {f}" for f, v in versus)
            + "; relative to oracle: " + ", ".join(f"{v:.3f} @ {f}" for f, v in gap)
            + " (< 1 = prunepath better).")
    if "smollm2-135m" in results["models"]:
        dense = results["models"]["smollm2-135m"]["dense"]
        oracle = {m["active_fraction"]: m["oracle"] for m in results["matched"]
                  if m["model"] == "smollm2-135m"}
        for fraction, target in ((0.5, 1.8), (0.8, 1.15)):
            ratio = oracle[fraction] and oracle[fraction] / dense
            verdict = "-" if ratio is None else ("met" if ratio <= target else "missed")
            lines.append(
                f"smollm2-135m: the oracle (tau rule on each expert's true output share, same "
                f"experts) reaches ratio {fmt(ratio)} at {fraction:.0%} active, target {target}: "
                f"{verdict} even without a router's error.")
    lines.append("prunepath's plan: expert size and calibration tokens as above, linear routers "
                 "(ridge fit of log output shares refined by cross-entropy) and a layer budget "
                 "(per-FFN tau tables), kept only where it brings a calibration batch's outputs "
                 "closer to dense, then end-to-end router distillation (pass distill_routers, on "
                 "the calibration batches but the first), kept only where it lowers the "
                 "distillation loss on that first batch, then the routers' softmax temperature "
                 "(pass choose_temperature: one, or one per tau) chosen on the same batch (the "
                 "backend prints all three decisions); topk, static and oracle run at the "
                 "model-wide tau, topk/static on the same plan's routers/rankings. What each part "
                 "contributes: benchmarks/results/router_ablation.md.")
    lines.append("Perplexity is over independent 256-token windows (no earlier context), so it is "
                 "higher than full-context figures; the ratios to dense are what compare. The eval "
                 "sets are small (see each model's token count): differences of a few percent "
                 "between methods are not established by this run alone.")
    return lines


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    names = list(results["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        summary = results["models"][name]
        causal = summary["metric"] == "perplexity"
        for method in METHODS:
            points = sorted((r["active_fraction"], r["ratio_to_dense"] if causal else r["cosine"])
                            for r in results["records"]
                            if r["model"] == name and r["method"] == method)
            ax.plot(*zip(*points), marker="o", markersize=3, label=method)
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        if causal:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
            ax.set_ylabel("perplexity / dense perplexity")
            ax.set_title(f"{name} (dense ppl {summary['dense']:.2f})")
        else:
            ax.set_ylabel("embedding cosine to dense")
            ax.set_title(name)
        ax.set_xlabel("FFN active fraction")
        ax.invert_xaxis()
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("WikiText-2 held-out half, calibrated on the other half")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def environment() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "ppcompile"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split("\n")
    dirty = [line[3:] for line in dirty if line.strip()]
    state = f"commit {head}" + (f" with uncommitted changes to {', '.join(dirty)}" if dirty
                                else "")
    return (f"{state}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{cpu_name()} (bfloat16 products {'native' if cpu_multiplies_bf16() else 'emulated'})")


def cpu_name() -> str:
    """The CPU's model name (plan times differ 1.5x between this project's machines)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
