"""Pass 8: store what this compile planned in the plan cache.

Matches: graphs in which at least one FFN was planned by this compile (options.cache on).
Guarantees: the graph is unchanged; the plan of every FFN of the graph is written to the cache
under the graph's fingerprint, the plan options and the calibration data's hash, so the same
compile later (or a bare options={"tau": ...} compile of the same weights) skips calibration.
A cache that cannot be written (PPCOMPILE_CACHE_DIR unwritable, disk full) costs a warning, not
the compile: the cache only saves time.
"""
from __future__ import annotations

import warnings

import torch.fx as fx

from .. import plan as plans
from ..options import PLAN_FIELDS


def save_plans(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    ffns = gm.meta["ppcompile_ffns"]
    if not ctx.options.cache or not any(f.planned_now for f in ffns):
        return gm
    fingerprint = gm.meta.get("ppcompile_fingerprint")
    if fingerprint is None:
        from .attach_plans import graph_fingerprint
        fingerprint = graph_fingerprint(gm, ctx)
    opts = ctx.options
    calibration = plans.data_hash(opts.calibration)
    path = plans.cache_path(fingerprint, opts.plan_key(), calibration or "inputs")
    try:
        plans.save(path, [f.state for f in ffns if f.state is not None], fingerprint,
                   dict(zip(PLAN_FIELDS, opts.plan_key())), calibration={"sha": calibration})
    except OSError as e:
        warnings.warn(f"ppcompile: could not store the plan in the plan cache ({e}); the next "
                      "compile of this model will calibrate again (set PPCOMPILE_CACHE_DIR to a "
                      "writable directory, or options={'cache': False})", stacklevel=2)
    return gm

