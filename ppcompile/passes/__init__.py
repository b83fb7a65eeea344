"""The pass pipeline, in order. Each pass is a function (gm, ctx) -> gm with a docstring that says
what it matches and what it guarantees; the backend runs them with `run_passes`."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ffn import REGISTRY
from ..graph import dropout_off
from ..options import Options
from .attach_plans import attach_plans
from .build_experts import build_experts
from .calibrate import calibrate
from .choose_temperature import choose_temperature
from .distill_routers import distill_routers
from .find_ffns import find_ffns
from .lower_to_triton import lower_to_triton
from .rewrite import rewrite
from .save_plans import save_plans
from .train_routers import train_routers


@dataclass
class Context:
    """What every pass may read: the example inputs of this graph, their tensors by node, and the
    options."""

    example_inputs: list
    values: dict
    options: Options
    options_source: object = None  # the dict given to torch.compile, to tell compile calls apart


PASSES = [find_ffns, attach_plans, calibrate, build_experts, train_routers, distill_routers,
          choose_temperature, save_plans, rewrite, lower_to_triton]
# the passes that run the model: with dropout off (graph.dropout_off), in whatever mode it was
# compiled; find_ffns runs before, so an FFN with dropout inside is not matched in train() mode
RUN_THE_MODEL = {calibrate, train_routers, distill_routers, choose_temperature}


log = logging.getLogger("ppcompile")


def run_passes(gm: fx.GraphModule, ctx: Context, passes=None) -> fx.GraphModule:
    """Run the passes in order; each one's wall time goes to the "ppcompile" logger (INFO).
    A run that fails or is interrupted (Ctrl-C during calibration) leaves no plan behind: the
    FFNs it planned are dropped from the registry, whose states may hold half-tuned routers and
    thresholds, so the next call plans them again (their weights stay permuted: the same
    function)."""
    try:
        with flush_denormals():
            for graph_pass in PASSES if passes is None else passes:
                start = time.perf_counter()
                with dropout_off(gm) if graph_pass in RUN_THE_MODEL else nullcontext():
                    gm = graph_pass(gm, ctx)
                log.info("pass %s: %.2f s", graph_pass.__name__, time.perf_counter() - start)
    except BaseException:
        for ffn in gm.meta.get("ppcompile_ffns", []):
            if ffn.planned_now:
                REGISTRY.drop(*ffn.key_params(ctx.values))
        raise
    return gm


@contextmanager
def flush_denormals():
    """Subnormal floats read as zero on the CPU while the passes run (restored after). The
    routers' training multiplies by softmax probabilities of experts far from the top, whose
    products underflow into subnormals, and x86 cores take ~100x longer on those: one router's
    weight gradient (384 x 2048 x 576) took 102 ms instead of 3 (router_ablation.md, L)."""
    before = float(torch.tensor([1e-40]) * 1.0) == 0.0  # no getter: probe it
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
