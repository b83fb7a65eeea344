"""The backend's options: one validated dataclass, built from the `options=` dict of torch.compile."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

import torch


class OptionError(ValueError):
    """An option has the wrong name, type or value; the message says which and what is allowed."""


@dataclass(frozen=True)
class Options:
    """Options of the `prunepath` backend (`torch.compile(..., options={...})`).

    tau: float in (0, 1]. Per token, keep the highest-ranked experts until their router
        probability adds up to tau (the expert that crosses tau is kept). 1.0 keeps every expert
        and reproduces the dense model. Change it later with `ppcompile.set_tau`, without
        recompiling.
    calibration: tensor or None. Inputs to calibrate on: token ids [N, T] for a language model,
        or whatever the compiled module takes as its first tensor input (hidden states
        [N, T, d] for a single layer). They are cut into windows of the traced input's shape.
        None: calibrate on the inputs of the first call, with a warning.
    expert_size: int >= 1. Neurons per expert; must divide every matched FFN's width.
    calibration_tokens: int >= 64. Tokens sampled per FFN for clustering and router training
        (calibration runs on all tokens, but keeps at most this many per FFN in memory).
    router_steps: int >= 0. Optimizer steps of router fine-tuning per FFN.
    seed: int. Seeds sampling, clustering and router training: same seed, same plan.
    """

    tau: float = 0.9
    calibration: torch.Tensor | None = field(default=None, repr=False, compare=False)
    expert_size: int = 16
    calibration_tokens: int = 4096
    router_steps: int = 300
    seed: int = 0

    def __post_init__(self):
        check_tau(self.tau, "tau")
        if self.calibration is not None and not isinstance(self.calibration, torch.Tensor):
            raise OptionError(
                f"option 'calibration' must be a torch.Tensor (token ids [N, T] or the module's "
                f"first input), got {type(self.calibration).__name__}"
            )
        _check_int(self, "expert_size", 1)
        _check_int(self, "calibration_tokens", 64)
        _check_int(self, "router_steps", 0)
        _check_int(self, "seed", None)

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
        """The options that shape a plan (permutation and routers); tau is not one of them."""
        return (self.expert_size, self.calibration_tokens, self.router_steps, self.seed)

    def replace(self, **changes) -> Options:
        return dataclasses.replace(self, **changes)


def check_tau(tau, name="tau") -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise OptionError(f"option '{name}' must be a float in (0, 1], got {type(tau).__name__} {tau!r}")
    if not (0.0 < float(tau) <= 1.0) or math.isnan(tau):
        raise OptionError(f"option '{name}' must be a float in (0, 1], got {tau!r}")
    return float(tau)


def _check_int(opts, name, minimum):
    value = getattr(opts, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"option '{name}' must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise OptionError(f"option '{name}' must be an int >= {minimum}, got {value!r}")
