"""User-facing views of a compiled model: report() and set_tau()."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from tabulate import tabulate

from . import plan as plans
from .ffn import REGISTRY, SparseFFN
from .options import PLAN_FIELDS, check_tau


def _states(compiled) -> list[SparseFFN]:
    module = getattr(compiled, "_orig_mod", compiled)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"ppcompile: expected the module returned by torch.compile (or the module itself), "
            f"got {type(compiled).__name__} (after model.forward = torch.compile(model.forward, "
            f"...), pass the model: ppcompile.set_tau(model, 0.7))")
    # FFN weights may be buffers too (the backend plans whatever tensors the graph reads)
    return REGISTRY.states_of([*module.parameters(), *module.buffers()])


def set_tau(compiled, tau: float) -> None:
    """Set tau for every sparse FFN of this model, at run time (no recompilation), and reset the
    statistics that report() shows."""
    tau = check_tau(tau, "tau")
    states = _states(compiled)
    if not states:
        warnings.warn("ppcompile.set_tau: this model has no sparse FFN (yet: a compiled model plans "
                      "its FFNs at its first call; to start at another tau, pass "
                      "options={'tau': ...} to torch.compile); nothing changed", stacklevel=2)
    for state in states:
        state.set_tau(tau)


@dataclass
class Report:
    """rows: one dict per sparse FFN (name, kind, d_model, d_ff, expert_size, num_experts, tau:
    the model-wide tau, ffn_tau: this FFN's own threshold (its layer budget), shown where a
    "prunepath" graph runs it (the other methods read the model-wide tau), active_fraction:
    token-weighted share of neurons computed since the last set_tau or compile, None before the
    first call; 1.0 at tau = 1, where every expert is kept, called or not)."""

    rows: list

    @property
    def active_fraction(self) -> float | None:
        """Mean active fraction over FFNs, weighted by FFN width (None if nothing ran yet)."""
        rows = [r for r in self.rows if r["active_fraction"] is not None]
        if not rows:
            return None
        return sum(r["active_fraction"] * r["d_ff"] for r in rows) / sum(r["d_ff"] for r in rows)

    def __str__(self):
        if not self.rows:
            return ("ppcompile: no sparse FFN in this model (yet: a compiled model plans its FFNs "
                    "at its first call)")
        table = tabulate(self.rows, headers="keys", floatfmt=".3f", missingval="-")
        mean = self.active_fraction
        tail = "" if mean is None else f"\nmean active fraction: {mean:.3f}"
        return table + tail


def save_plan(compiled, path) -> None:
    """Save the model's plan (neuron order, routers) to `path` (safetensors with a
    JSON header). `options={"plan": path}` then compiles the same weights without calibrating."""
    states = _states(compiled)
    if not states:
        raise ValueError("ppcompile: this model has no plan yet: compile it and call it once first")
    keys = {s.plan_key for s in states}
    if len(keys) > 1:  # a plan file records one set of plan options
        made = "; ".join(f"{s.name}: {dict(zip(PLAN_FIELDS, s.plan_key))}" for s in states)
        raise ValueError(f"ppcompile.save_plan: this model's FFNs were planned with different "
                         f"options ({made}); a plan file holds FFNs planned with one set")
    key = keys.pop()
    fingerprint = plans.graph_fingerprint([], [plans.sorted_columns(s.signature) for s in states])
    made_on = {s.calibration for s in states}  # the data's hash, where one made them all
    plans.save(path, states, fingerprint, dict(zip(PLAN_FIELDS, key)),
               calibration={"sha": made_on.pop()} if len(made_on) == 1 else None)


def report(compiled) -> Report:
    rows = []
    for s in _states(compiled):
        rows.append(dict(name=s.name, kind=s.kind, d_model=s.d_model, d_ff=s.d_ff,
                         expert_size=s.expert_size, num_experts=s.num_experts,
                         tau=_short(s.model_tau),
                         ffn_tau=_short(s.tau) if "prunepath" in s.methods else None,
                         active_fraction=s.active_fraction()))
    return Report(rows)


def _short(tau: torch.Tensor) -> float:
    return float(f"{float(tau):.4g}")  # 4 significant digits: 1e-09 stays 1e-09
