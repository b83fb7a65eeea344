"""The `prunepath` torch.compile backend: find FFNs, calibrate, build experts, train routers,
rewrite to sparse-FFN nodes, lower them to Triton on the GPU, compile with Inductor.

    compiled = torch.compile(model, backend="prunepath", options={"tau": 0.9, "calibration": ids})
"""
from __future__ import annotations

import operator
import time
import warnings
import weakref
from pathlib import Path

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from . import plan as plans
from .ffn import REGISTRY
from .graph import graph_tensors
from .options import OptionError, Options
from .passes import Context, PASSES, log, run_passes
from .passes.lower_to_triton import is_column_major, relayout_
from .passes.rewrite import extra_inputs

# graphs compiled dense warn once per model (its parameters: not again per recompile), and not
# at all in a compile call whose other graphs have FFNs (a model's loss is often a graph of its own)
_warned, _with_ffns = set(), set()


def prunepath(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode=None):
    """torch.compile backend (registered by name through the `torch_dynamo_backends` entry point)."""
    if mode not in (None, "default"):
        raise OptionError(
            f"torch.compile(mode={mode!r}) sets Inductor's own modes; the prunepath backend compiles "
            "with Inductor and, on the GPU, replays CUDA graphs itself (option 'cudagraphs', "
            "default True): leave mode out and pass options={...}")
    opts = Options.from_dict(options)
    dense, work = _copy(gm), _copy(gm)  # dynamo keeps using its own graph: we work on copies
    ctx = Context(list(example_inputs), graph_tensors(work, example_inputs), opts, options)
    gm = run_passes(work, ctx)
    layout = gm.meta.get("ppcompile_inputs", [])
    if not layout:
        if not gm.meta.get("ppcompile_tokenless"):
            _warn_dense(example_inputs, options)
        return inner_compile(dense, list(example_inputs), opts.cudagraphs)
    if options is not None:
        _with_ffns.add(id(options))
    sparse = SparseGraph(layout, dense, opts, options)
    relayout = gm.meta.get("ppcompile_relayout")
    if relayout:
        # Dynamo guards on parameter strides, and checks the guards of a frame right after
        # compiling it: the weights cannot change layout now. This graph runs eagerly and
        # re-lays out the weights it is called with; the next call recompiles for the new layout
        # (or, when dynamo skips guards and calls this entry again, it compiles itself).
        sparse.compiled, sparse.relayout = gm, relayout
        return sparse
    example = list(example_inputs) + sparse.ffn_inputs(example_inputs)[0]
    sparse.compiled = inner_compile(gm, example, opts.cudagraphs)
    if sparse.dynamic:  # its shapes are symbolic only now, inside dynamo's compile
        sparse.compile_dense(example_inputs)
    return sparse


class WeightWatch:
    """Notices FFN weights replaced in place after their plan was attached, e.g. load_state_dict
    into a compiled model: a plan fits its weights only in the neuron order it put them in, and
    the graph would go on computing with the old routers. Per call it reads the down weights'
    version counters (cheap); where one moved, it compares a fixed sample of 64 of the weight's
    values with the last one seen, by any graph of the model (what was seen lives on the FFN's
    state: a model evaluated, trained through another graph, then evaluated again). A small
    change passes; a large one passes if the weight's per-neuron column sums are still far
    closer to the plan's order than to the original (training in place,
    plan.trained_in_place), else it raises, saying how to re-plan."""

    SAMPLE = 64
    REPLACED = 0.5  # relative change of the sample; a training step changes it by far less

    def __init__(self, args, layout, states):
        self.watched = []  # (down weight's position, state)
        for (_, down, _), state in zip(layout, states):
            w = args[down]
            try:
                version = w._version
            except RuntimeError:  # inference-mode tensors keep no version counter
                continue
            seen = state.seen_down
            if seen is None or (seen["shape"], seen["device"]) != (tuple(w.shape), w.device):
                k = torch.arange(self.SAMPLE, device=w.device)
                where = ((k * 7919) % w.shape[0], (k * 104729) % w.shape[1])
                state.seen_down = dict(shape=tuple(w.shape), device=w.device, version=version,
                                       where=where, sample=w.detach()[where].double(),
                                       columns=_down_columns(w, state.d_ff))
            self.watched.append((down, state))

    def check(self, args):
        moved = [(down, state) for down, state in self.watched
                 if args[down]._version != state.seen_down["version"]]
        if not moved:
            return
        now = [args[down].detach()[state.seen_down["where"]].double() for down, state in moved]
        changes = torch.stack([
            (sample - state.seen_down["sample"]).norm()
            / state.seen_down["sample"].norm().clamp_min(1e-12)
            for sample, (_, state) in zip(now, moved)]).tolist()
        for (down, state), sample, change in zip(moved, now, changes):
            seen = state.seen_down
            columns = None
            if change > self.REPLACED:
                columns = _down_columns(args[down], state.d_ff)
                if not plans.trained_in_place(columns, seen["columns"], state.perm):
                    raise RuntimeError(
                        f"ppcompile: the weights of FFN '{state.name}' were replaced in place "
                        "since this model was compiled (load_state_dict, or a compile with other "
                        "plan options that re-planned them); its plan no longer fits them. "
                        "Compile again (torch._dynamo.reset(), then torch.compile): the compile "
                        "checks them, puts the same weights back in their plan's neuron order "
                        "and plans other weights anew")
            seen.update(version=args[down]._version, sample=sample)
            if columns is not None:
                seen["columns"] = columns


def _down_columns(w_down: torch.Tensor, d_ff: int) -> torch.Tensor:
    """[d_ff, 1] float64: per neuron (in the weight's current order) the sum of its down weights
    (a column of nn.Linear's [d, d_ff], a row of GPT-2 Conv1D's [d_ff, d])."""
    neurons_last = w_down.shape[1] == d_ff
    return w_down.detach().sum(0 if neurons_last else 1).double().cpu()[:, None]


def inner_compile(gm: fx.GraphModule, example_inputs, cudagraphs=False):
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx

    on_gpu = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    start = time.perf_counter()
    patches = {"triton.cudagraphs": bool(cudagraphs and on_gpu)}
    if config.post_grad_custom_post_pass is None:
        patches["post_grad_custom_post_pass"] = KernelsInCacheKey()
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    log.info("inductor: %.2f s", time.perf_counter() - start)
    return compiled


class KernelsInCacheKey(CustomGraphPass):
    """A post-grad pass that changes nothing; its uuid puts the source of our kernels and their
    launcher into Inductor's FX-graph cache key. Inductor traces a triton_op's launcher (its
    launch table) only while lowering, after that key is made, so a changed launch table was
    served the code the previous one generated (GPU_RUNS.md, run 97). Installed only where the
    user has no post-grad pass of their own (theirs then decides the key)."""

    FILES = tuple(str(Path(__file__).parent / "kernels" / name)
                  for name in ("triton_ffn.py", "gpu_op.py"))

    def __call__(self, graph: fx.Graph) -> None:
        pass

    def uuid(self) -> bytes:
        return get_hash_for_files(self.FILES)


class SparseGraph:
    """The compiled graph plus, per call, the router/tau/stats inputs of the FFNs whose weights
    it is called with (looked up by weight identity, so a graph that dynamo reuses for another
    layer uses that layer's plan; one never seen is planned on the spot from the call's inputs).

    While every FFN of the graph keeps every expert (model-wide tau >= 1, under any method), the
    call goes to the dense graph instead, compiled by Inductor the first time it is needed: the
    routers would select everything, so they, the selection and the kernels' bookkeeping are pure
    cost there (a Llama-3-8B decode step at tau = 1 took 0.96x dense's GPU time on the kernels,
    benchmarks/results/GPU_RUNS.md). The weights are the same tensors (permuted in place), so
    the dense graph computes the dense FFN, to the rounding of a reordered sum. A graph with
    symbolic shapes (dynamic=True, or dynamo's second prompt length) has its dense twin compiled
    with it; a static one compiles it at its first use."""

    def __init__(self, layout, dense_gm, options, options_source):
        self.layout, self.dense_gm = layout, dense_gm
        self.options, self.options_source = options, options_source
        self.compiled, self.relayout = None, []
        self.dense_compiled = None
        self.dynamic = any(isinstance(n.meta.get("example_value"), torch.SymInt)
                           for n in dense_gm.graph.nodes if n.op == "placeholder")
        # per set of FFN weights the graph is called with (one per layer where dynamo reuses
        # the graph across layers): their extra inputs, states and watch (ffn_inputs)
        self._seen = {}

    def __call__(self, *args):
        extras, states, watch = self.ffn_inputs(args)
        watch.check(args)
        if not self.relayout and all(state.keeps_all for state in states):
            dense = self._dense(args)
            if dense is not None:
                return dense(*args)
        if self.relayout and all(is_column_major(args[position]) == column_major
                                 for position, column_major in self.relayout):
            # the weights have their layout, and dynamo calls this eager entry anyway: it skips
            # guards (torch.compiler.set_stance(skip_guard_eval_unsafe=True), as decode loops
            # do), so it would never reach the recompiled entry. Compile once, here.
            self.compiled = inner_compile(self.compiled, [*args, *extras],
                                          self.options.cudagraphs)
            self.relayout = []
        out = self.compiled(*args, *extras)
        for position, column_major in self.relayout:
            relayout_(args[position], column_major)
        return out

    def _dense(self, args):
        """The dense graph, compiled for these (static) shapes at its first use; None for a
        dynamic graph that has none (compiled before its relayout): it runs sparse."""
        if self.dense_compiled is None and not self.dynamic:
            log.info("every FFN keeps every expert (tau >= 1): compiling the dense graph (once)")
            self.compile_dense(args)
        return self.dense_compiled

    def compile_dense(self, example_inputs):
        self.dense_compiled = inner_compile(_copy(self.dense_gm), list(example_inputs),
                                            self.options.cudagraphs)

    def ffn_inputs(self, args) -> tuple:
        """(extra graph inputs, states, weight watch) of the FFN weights in args, made the first
        time these weights are seen (planned then if they have no plan), and again when the
        registry has changed since (another compile gave them a new plan, or a move to another
        device or dtype gave their router new tensors): kept, they would run the old routers."""
        key = tuple(id(args[up]) for up, _, _ in self.layout)
        seen = self._seen.get(key)
        if seen is not None and seen[3] == REGISTRY.generation:
            return seen[:3]
        states = [REGISTRY.get(args[up], args[down]) for up, down, _ in self.layout]
        if any(s is None for s in states):
            self._plan_unseen(args)
            states = [REGISTRY.get(args[up], args[down]) for up, down, _ in self.layout]
        extras = []
        for (up, down, size), state in zip(self.layout, states):
            if state.expert_size != size:
                raise RuntimeError(
                    f"ppcompile: FFN '{state.name}' was re-planned with expert_size="
                    f"{state.expert_size} after this graph was compiled for {size}; compile again")
            extras += extra_inputs(state, self.options.method)
            state.methods.add(self.options.method)
        if seen is not None and all(map(operator.is_, seen[0] + seen[1], extras + states)):
            watch = seen[2]  # the same inputs: keep what the watch has seen
        else:
            watch = WeightWatch(args, self.layout, states)
        if seen is None:
            # the key is the weights' ids, which Python reuses once they are freed: another
            # model's weights at those ids would run with this entry's routers
            for up, _, _ in self.layout:
                weakref.finalize(args[up], _forget, weakref.ref(self), key)
        self._seen[key] = (extras, states, watch, REGISTRY.generation)
        return extras, states, watch

    def _plan_unseen(self, args):
        warnings.warn(
            "ppcompile: this compiled graph is called with weights it has no plan for (dynamo "
            "reuses one graph for several instances of a module); planning them now, from the "
            "calibration option or else this call's inputs", stacklevel=3)
        gm = _copy(self.dense_gm)
        ctx = Context(list(args), graph_tensors(gm, args), self.options, self.options_source)
        passes = [p for p in PASSES if p.__name__ not in ("rewrite", "lower_to_triton")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_passes(gm, ctx, passes)


def _forget(graph_ref, key):
    graph = graph_ref()
    if graph is not None:
        graph._seen.pop(key, None)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of gm's graph, sharing gm's attributes, with the metadata that AOTAutograd reads
    off dynamo graphs (sources of inputs, which inputs are static)."""
    graph = fx.Graph()
    env = {}
    graph.output(graph.graph_copy(gm.graph, env))
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    for old, new in env.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return copy


def _warn_dense(example_inputs, options):
    key = (id(options), tuple(id(t) for t in example_inputs if isinstance(t, torch.nn.Parameter)))
    if key in _warned or (options is not None and id(options) in _with_ffns):
        return
    _warned.add(key)
    warnings.warn("ppcompile: no FFN matched in this graph (a model without one, or a piece of a "
                  "model between graph breaks); it is compiled dense", stacklevel=2)
