"""The backend's options: one validated dataclass, built from the `options=` dict of torch.compile."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, fields

import torch

from .kernels.reference import METHODS


# the options a plan is made from: its cache key, and what a plan file records
PLAN_FIELDS = ("expert_size", "calibration_tokens", "distill_epochs", "seed")
# what a plan file written before a field existed was made with
PLAN_FIELD_DEFAULTS = {"distill_epochs": 0}


class OptionError(ValueError):
    """An option has the wrong name, type or value; the message says which and what is allowed."""


@dataclass(frozen=True)
class Options:
    """Options of the `prunepath` backend (`torch.compile(..., options={...})`).

    tau: float in (0, 1]. Per token, keep the highest-ranked experts until their router
        probability adds up to tau (the expert that crosses tau is kept). 1.0 keeps every expert
        and reproduces the dense model. Each FFN may run at its own threshold for this tau (a
        layer budget fitted at calibration: the model keeps on average what tau would keep
        everywhere, moved to the FFNs where dropping experts costs most; kept only if a
        calibration batch shows it helps). Change it later with `ppcompile.set_tau`, without
        recompiling.
    calibration: tensor or None. Inputs to calibrate on: token ids [N, T] for a language model,
        or whatever the compiled module takes as its first tensor input (hidden states
        [N, T, d] for a single layer). They are cut into windows of the traced input's shape.
        None: reuse the newest cached plan of this model (see cache), else calibrate on the
        inputs of the first call, with a warning.
    expert_size: int >= 1. Neurons per expert; must divide every matched FFN's width. 8 measured
        clearly better than 16 at equal active fraction on SmolLM2-135M (see
        benchmarks/results/router_ablation.md), at twice the router's width. On the GPU each
        call pays a selection whose cost grows with the number of experts: one token through a
        4096x14336 FFN at 25% active took 44.4 us with 8-neuron experts against 39.3 with 16
        on an H200 (GPU_RUNS.md, run 102); benchmarks/kernels.py and decode.py use 16.
    calibration_tokens: int >= 64. Tokens sampled per FFN for clustering and router fitting
        (calibration runs on all tokens, but keeps at most this many per FFN in memory: about
        4 * n * (d + d_ff) bytes per FFN). Routers are data-limited: 8192 measured clearly
        better than 4096 on SmolLM2-135M (benchmarks/results/router_ablation.md).
    distill_epochs: int >= 0. Passes over the calibration data of end-to-end router
        fine-tuning (pass distill_routers: all routers trained together on the model's own
        outputs, KL to the dense model for language models); 0 keeps the per-layer fits. On
        SmolLM2-135M's held-out text 1 / 2 / 3 epochs gave perplexity ratio 2.47 / 2.36 / 2.33
        at 50% active (benchmarks/results/router_ablation.md, sections F and G); with 2 epochs
        (the default) the distillation took 82-91 s of SmolLM2's 171-186 s of planning on a
        2-core EPYC (section Q). Kept only if a calibration batch shows it helps.
    seed: int in [0, 2**63). Seeds sampling, clustering and router training: same seed, same plan.
    method: "prunepath" (default), "topk", "static" or "oracle": how experts are chosen, for
        experiments at equal budgets. "topk" keeps the router's top round(tau * E) experts per
        token (MoEfication), "static" the same round(tau * E) experts for every token (static
        expert pruning), "oracle" applies the tau rule to each expert's true share of the FFN
        output (computes the dense FFN: slow by design; bounds what a router can reach). For
        "topk" and "static", tau is the fraction of experts kept (tau is held as float32: where
        tau * E is a half, that float rounds, e.g. 0.35 of 10 experts keeps 3). All methods
        share one plan.
    plan: path or None. A plan file (see ppcompile.save_plan) to use instead of calibrating; it
        must have been made for these weights, or it is refused. It is read when an FFN needs
        a plan (the first call): a recompile of FFNs that carry it does not read it again.
    cache: bool. Reuse and store plans in the cache directory ($PPCOMPILE_CACHE_DIR, default
        ~/.cache/ppcompile/plans), keyed by a fingerprint of the weights, the plan options,
        the calibration data and a hash of the planning code, so compiling the same model again
        skips calibration, and other planning code (an upgrade) plans afresh.
    cudagraphs: bool. On the GPU, replay the compiled graphs as CUDA graphs (Inductor's
        cudagraph trees, as mode="reduce-overhead" does): decoding is launch-bound without them.
        Inputs then need static addresses between calls (HF's static KV cache has them), and a
        call's outputs are overwritten by the next call (clone what you keep).
    """

    tau: float = 0.9
    calibration: torch.Tensor | None = field(default=None, repr=False, compare=False)
    expert_size: int = 8
    calibration_tokens: int = 8192
    distill_epochs: int = 2
    seed: int = 0
    method: str = "prunepath"
    plan: str | os.PathLike | None = None
    cache: bool = True
    cudagraphs: bool = True

    def __post_init__(self):
        object.__setattr__(self, "tau", check_tau(self.tau, "tau"))  # a float, whatever was given
        if self.calibration is not None and not isinstance(self.calibration, torch.Tensor):
            raise OptionError(
                f"option 'calibration' must be a torch.Tensor (token ids [N, T] or the module's "
                f"first input), got {type(self.calibration).__name__}"
            )
        if self.calibration is not None and self.calibration.layout != torch.strided:
            raise OptionError(
                f"option 'calibration' is a {self.calibration.layout} tensor: pass a dense one "
                "(calibration.to_dense())")
        if self.calibration is not None and self.calibration.device.type == "meta":
            raise OptionError("option 'calibration' is on the meta device: it holds no data")
        if self.calibration is not None and (self.calibration.dtype == torch.bool
                                             or self.calibration.dtype.is_complex):
            raise OptionError(
                f"option 'calibration' has dtype {self.calibration.dtype}: token ids need an "
                "integer dtype, hidden states a floating one")
        _check_int(self, "expert_size", 1)
        _check_int(self, "calibration_tokens", 64)
        _check_int(self, "distill_epochs", 0)
        _check_int(self, "seed", 0, 2**63 - 1)  # what a torch.Generator takes
        if self.plan is not None and not isinstance(self.plan, (str, os.PathLike)):
            raise OptionError(f"option 'plan' must be a path to a plan file, got {type(self.plan).__name__}")
        for name in ("cache", "cudagraphs"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not _numpy_bool(value):
                raise OptionError(f"option '{name}' must be a bool, got {type(value).__name__} {value!r}")
            object.__setattr__(self, name, bool(value))
        if self.method not in METHODS:
            raise OptionError(
                f"option 'method' must be one of {', '.join(map(repr, METHODS))}, got {self.method!r}")

    @classmethod
    def from_dict(cls, options: dict | Options | None) -> Options:
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if not isinstance(options, dict):
            raise OptionError(f"options must be a dict, got {type(options).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionError(
                f"unknown option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(known))}"
            )
        return cls(**options)

    def plan_key(self) -> tuple:
        """The options that shape a plan (permutation and routers), in PLAN_FIELDS order; tau and
        method are not among them."""
        return tuple(getattr(self, name) for name in PLAN_FIELDS)


def _numpy_bool(value) -> bool:
    """numpy's bool scalar (ints and floats of numpy pass as numbers.Integral / Real already)."""
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")


def check_tau(tau, name="tau") -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):  # numpy floats too
        raise OptionError(f"option '{name}' must be a float in (0, 1], got {type(tau).__name__} {tau!r}")
    try:
        value = float(tau)
    except OverflowError:  # an int beyond float's range
        value = math.inf
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise OptionError(f"option '{name}' must be a float in (0, 1], got {tau!r}")
    if float(torch.tensor(value, dtype=torch.float32)) == 0.0:
        # the FFNs hold tau as float32: it would be 0 there, and keep no expert
        raise OptionError(f"option '{name}' must be a float in (0, 1] that float32 holds as "
                          f"more than 0 (at least 1.4e-45), got {tau!r}")
    return value


def _check_int(opts, name, minimum, maximum=None):
    value = getattr(opts, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy ints too
        raise OptionError(f"option '{name}' must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    object.__setattr__(opts, name, value)
    if value < minimum:
        raise OptionError(f"option '{name}' must be an int >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise OptionError(f"option '{name}' must be an int in [{minimum}, {maximum}], got {value!r}")
