"""Pass 3: run the captured graph on calibration inputs and sample what each FFN sees.

Matches: FFNs without a plan. The graph runs eagerly on windows of `options.calibration` cut to
the traced input's shape (every other input keeps its example value), one batch at a time, under
plan_precision (bfloat16 matrix products where the device has them and the weights are float32).
Guarantees: the graph is unchanged, and so is every input it mutates (a static KV cache and its
counters are restored after each batch); each such FFN gets `sample = {"x": [n, d], "h": [n, d_ff],
"weight": [n]}` (its inputs and intermediate activations, float32, on the weights' device) for n
tokens drawn uniformly at random over all calibration tokens, n <= options.calibration_tokens, so
memory stays bounded however much text is given; tokens whose x or h is not finite (NaN, or inf
from a float16 overflow) are left out with a warning, and an FFN left with none is refused.
"weight" is, per token, the share of the FFN's contribution in the residual stream it is added
to, ||c||^2 / ||r + c||^2 (c: the FFN output, or what a norm after it makes of it; found as the
first add after the FFN that adds it to a tensor not computed from it), or 1 where no such add
exists: how much an error in this FFN's output moves what the next layer sees. When distillation follows (options.distill_epochs > 0), the
graph's dense outputs on the calibration batches stay in gm.meta["ppcompile_dense"] while they
fit DENSE_KEEP_BYTES (kept_outputs: in 16 bits where that holds them). Deterministic for a
given seed.
"""
from __future__ import annotations

import math
import operator
import sys
import time
import warnings

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from ..graph import concrete, is_user_input
from ..options import OptionError
from .build_experts import refuse_indivisible


# The dense outputs of the calibration batches stay (gm.meta["ppcompile_dense"]: batch index ->
# kept_outputs) for the budget check and the distillation, which would otherwise run the
# dense graph again (SmolLM2: 7 more passes over 2048 tokens, ~25 s), while they fit in this
# many bytes (on the model's device); choose_temperature releases them
DENSE_KEEP_BYTES = 2 << 30


def calibrate(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    todo = [f for f in gm.meta["ppcompile_ffns"] if f.state is None]
    if not todo:
        # a graph before a graph break (the embeddings) may be the one the data feeds: then the
        # graphs after it, which take hidden states, calibrate on their call's inputs
        data = ctx.options.calibration
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        example = [concrete(v) for v in ctx.example_inputs]
        if data is not None and _fitting_inputs(placeholders, example, data):
            _FED.add(id(ctx.options_source))
        return gm
    refuse_indivisible(todo, ctx.options.expert_size)  # before the calibration runs, not after
    batches = calibration_batches(gm, ctx)
    sampler = _Sampler(todo, len(batches), ctx.options)
    observed = _observed_copy(gm, todo, sampler)
    restore_inputs = input_restorer(ctx)
    start = time.perf_counter()
    # only the distillation reads more than the budget check's batch 0
    keep_bytes = DENSE_KEEP_BYTES if ctx.options.distill_epochs > 0 else 0
    dense, dense_bytes = {}, 0
    with torch.no_grad(), plan_precision(gm, [(f, f.weights(ctx.values)) for f in todo]):
        for index, inputs in enumerate(tqdm(batches, desc="ppcompile: calibrating", unit="batch",
                                            leave=False, disable=len(batches) < 2)):
            out = observed(*inputs) if index else _first_run(observed, inputs, ctx)
            if dense_bytes < keep_bytes:  # copies only while they may be kept
                out = kept_outputs(out, inputs)
                size = sum(t.numel() * t.element_size() for t in out)
                if dense_bytes + size <= keep_bytes:
                    dense[index], dense_bytes = out, dense_bytes + size
            sampler.next_batch()
            restore_inputs()
    gm.meta["ppcompile_dense"] = dense
    for ffn in todo:
        ffn.sample = sampler.result(ffn)
    print(f"ppcompile: calibrated {len(todo)} FFNs on {sampler.total_rows} tokens "
          f"({len(batches)} batches) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return gm


def _first_run(observed, inputs, ctx):
    """The first calibration batch, whose failure is most likely the data's: say so."""
    data = ctx.options.calibration
    try:
        return observed(*inputs)
    except Exception as err:
        if data is None:  # the call's own inputs: not the option's fault
            raise
        hint = ""
        if not data.is_floating_point():
            hint = f"; its ids span {int(data.min())}..{int(data.max())}: are they in the vocabulary?"
        raise OptionError(
            f"option 'calibration': the model failed on the calibration data "
            f"({type(err).__name__}: {err}){hint}") from err


def floating_outputs(out) -> list:
    """The floating-point tensors of a graph's output, in float32."""
    return [t.float() for t in floating_leaves(out)]


def kept_outputs(out, inputs=()) -> list:
    """floating_outputs as they are kept. 16-bit outputs (a bfloat16 run's logits) stay as they
    are, with no copy unless they share memory with one of the run's `inputs` (which the next run
    may overwrite) or are views: a copy of SmolLM2's logits of one batch is 200 MB of fresh pages,
    ~0.3 s to fault in. Wider ones are kept in float16 where that holds them (magnitudes below
    2^15; 11 significant bits, ~0.01 on a logit of 20, against a bfloat16 student: half the
    memory, so twice the batches fit DENSE_KEEP_BYTES) and not all tiny (the largest at least
    2^-8: below that most values would be float16 subnormals), else in float32. Readers cast
    slices up."""
    held = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    kept = []
    for t in floating_leaves(out):
        t = t.detach()
        if t.dtype in (torch.float16, torch.bfloat16):
            storage = t.untyped_storage()
            shared = (storage.data_ptr() in held
                      or storage.nbytes() != t.numel() * t.element_size())  # a view
            kept.append(t.clone() if shared else t)
            continue
        fits = t.dtype != torch.float64 and (t.numel() == 0 or 2 ** -8 <= float(
            torch.stack(torch.aminmax(t)).abs().amax()) < 2 ** 15)  # no |t| temporary
        kept.append(t.to(torch.float16 if fits else torch.float32, copy=True))
    return kept


def floating_leaves(out) -> list:
    """The floating-point tensors of a graph's output, in their own dtype: the losses read them a
    slice at a time in float32 (a float32 copy of a bfloat16 run's logits, SmolLM2 on 2048 tokens,
    is 400 MB, and its fresh pages took 0.3-0.4 s to fault in per distillation update)."""
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def input_restorer(ctx):
    """A function that undoes what a run of the graph wrote into its non-parameter inputs (a
    static KV cache and its counters): call it after each calibration run."""
    saved = [(t, t.clone()) for t in ctx.example_inputs
             if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter)]

    def restore():
        for tensor, value in saved:
            tensor.copy_(value)
    return restore


def calibration_batches(gm: fx.GraphModule, ctx) -> list[list]:
    """Full input lists for the graph: the example inputs with the calibration input replaced by
    consecutive windows of the calibration data."""
    example = [concrete(v) for v in ctx.example_inputs]
    data = ctx.options.calibration
    if data is None:
        warnings.warn(
            "ppcompile: no calibration data: calibrating on the inputs of this first call only; "
            "pass options={'calibration': token_ids} (LongTensor [N, T]) for a useful plan",
            stacklevel=2)
        return [example]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = _calibration_input(placeholders, example, data, ctx)
    if index is None:
        warnings.warn(
            "ppcompile: the calibration data fits none of this graph's inputs, as in a graph that "
            "starts inside the model after a graph break (an encoder-decoder's decoder): "
            "calibrating it on this call's inputs only", stacklevel=2)
        return [example]
    traced = example[index]
    windows = _windows(data, traced.shape).to(device=traced.device, dtype=traced.dtype)
    per_batch = traced.shape[0]
    if len(windows) < per_batch:
        raise OptionError(
            f"option 'calibration' has {len(windows)} windows of shape {tuple(traced.shape[1:])}, "
            f"fewer than the traced batch size {per_batch}; give more calibration data")
    batches = []
    for start in range(0, len(windows) - per_batch + 1, per_batch):
        inputs = list(example)
        inputs[index] = windows[start:start + per_batch]
        batches.append(inputs)
    return batches


# compile calls (their options dicts) whose calibration data fed one of their graphs
_FED = set()


def _calibration_input(placeholders, example, data, ctx) -> int | None:
    """Index of the graph input that the calibration data stands for: a user input (not a
    parameter or buffer) of the same kind of dtype and trailing sizes; `input_ids` first. None
    where it fits no input of a graph whose compile call it fed before (a graph after a graph
    break); where it never fed one, the option is wrong and refused."""
    candidates = _fitting_inputs(placeholders, example, data)
    if not candidates and id(ctx.options_source) in _FED:
        return None
    if not candidates:
        inputs = [f"{n.name} {tuple(v.shape)} {v.dtype}" for n, v in zip(placeholders, example)
                  if is_user_input(n, v)]
        raise OptionError(
            f"option 'calibration' ({data.dtype} {tuple(data.shape)}) fits none of the compiled "
            f"graph's inputs ({', '.join(inputs) or 'none'}); pass token ids [N, T] for a "
            f"language model, or tensors shaped like the module's first input")
    named = [i for i in candidates if "input_ids" in placeholders[i].name]
    encoder = [i for i in named if "decoder_input_ids" not in placeholders[i].name]
    index = (encoder or named or candidates)[0]
    _FED.add(id(ctx.options_source))
    others = [placeholders[i].name for i in candidates if i != index]
    if others:
        warnings.warn(
            f"ppcompile: the calibration data feeds input '{placeholders[index].name}'; "
            f"{', '.join(map(repr, others))} keep this call's values in every calibration batch "
            "(an encoder-decoder's decoder FFNs are calibrated on them)", stacklevel=3)
    return index


def _fitting_inputs(placeholders, example, data) -> list[int]:
    """Indices of the user inputs (not parameters or buffers) that the calibration data could
    stand for: the same kind of dtype and trailing sizes."""
    candidates = []
    for i, (node, value) in enumerate(zip(placeholders, example)):
        if not is_user_input(node, value):
            continue
        if value.dtype.is_floating_point != data.dtype.is_floating_point:
            continue
        if value.dim() < 1 or tuple(value.shape[2:]) != tuple(data.shape[2:]) or \
                data.dim() not in (value.dim(), 1 if value.dim() == 2 else -1):
            continue
        candidates.append(i)
    return candidates


def _windows(data: torch.Tensor, shape) -> torch.Tensor:
    """Cut [N, T, ...] data into [n, T0, ...] windows of the traced length T0 (a 1-D token stream
    is one row)."""
    if len(shape) < 2:
        return data
    if data.dim() == 1:
        data = data.unsqueeze(0)
    length, traced = data.shape[1], shape[1]
    if length < traced:
        raise OptionError(
            f"option 'calibration' has sequences of length {length}, shorter than the traced "
            f"input length {traced}; pass sequences of at least {traced} tokens")
    per_row = length // traced
    data = data[:, :per_row * traced]
    return data.reshape(data.shape[0] * per_row, traced, *data.shape[2:])


class _Sampler:
    """Keeps, per FFN, the rows (tokens) at a fixed random set of positions over all batches. FFNs
    that see as many rows per batch share the positions; an encoder-decoder's decoder (or a
    vision tower) may see another count than its encoder, and gets positions of its own."""

    def __init__(self, ffns, num_batches, options):
        self.ffns, self.num_batches, self.options = ffns, num_batches, options
        self.batch, self.picks = 0, {}  # rows per batch -> the positions picked in each batch
        self.parts = {ffn: {"x": [], "h": [], "weight": []} for ffn in ffns}
        self.non_finite = dict.fromkeys(ffns, 0)  # sampled rows left out, per FFN

    @property
    def total_rows(self):
        return max(self.picks, default=0) * self.num_batches

    def _picks(self, rows_per_batch):
        if rows_per_batch not in self.picks:
            total = rows_per_batch * self.num_batches
            gen = torch.Generator().manual_seed(self.options.seed)
            keep = min(self.options.calibration_tokens, total)
            chosen = torch.randperm(total, generator=gen)[:keep].sort().values
            self.picks[rows_per_batch] = [
                chosen[(chosen >= b * rows_per_batch) & (chosen < (b + 1) * rows_per_batch)]
                - b * rows_per_batch for b in range(self.num_batches)]
        return self.picks[rows_per_batch]

    def add(self, ffn, x, h, contribution=None, total=None):
        x, h = x.reshape(-1, x.shape[-1]), h.reshape(-1, ffn.d_ff)
        rows = self._picks(x.shape[0])[self.batch].to(x.device)
        xs, hs = x.index_select(0, rows).float(), h.index_select(0, rows).float()
        weight = torch.ones(len(rows), device=x.device)
        if contribution is not None and contribution.shape == total.shape and \
                contribution.numel() == total.numel() and total.numel() % x.shape[0] == 0:
            c = contribution.reshape(x.shape[0], -1).index_select(0, rows).float()
            t = total.reshape(x.shape[0], -1).index_select(0, rows).float()
            weight = (c.square().sum(1) / t.square().sum(1).clamp_min(1e-30)).clamp(0, 1)
        # a token whose input or activation overflowed (float16) or is NaN would turn the
        # clustering and every router fit into NaN: left out, and counted for the warning
        finite = xs.isfinite().all(1) & hs.isfinite().all(1) & weight.isfinite()
        if not bool(finite.all()):
            self.non_finite[ffn] += int((~finite).sum())
            xs, hs, weight = xs[finite], hs[finite], weight[finite]
        self.parts[ffn]["x"].append(xs)
        self.parts[ffn]["h"].append(hs)
        self.parts[ffn]["weight"].append(weight)

    def next_batch(self):
        self.batch += 1

    def result(self, ffn):
        sample = {k: torch.cat(v) for k, v in self.parts.pop(ffn).items()}
        dropped = self.non_finite.pop(ffn)
        if dropped and not len(sample["x"]):
            raise OptionError(
                f"option 'calibration': every sampled token gave FFN '{ffn.name}' a non-finite "
                "input or activation (NaN or inf: a float16 model overflowing?); calibrate in "
                "bfloat16 or float32, or pass other calibration data")
        if dropped:
            warnings.warn(
                f"ppcompile: {dropped} of {dropped + len(sample['x'])} sampled calibration tokens "
                f"gave FFN '{ffn.name}' a non-finite input or activation (NaN or inf: a float16 "
                "model overflowing?); they are left out of its plan", stacklevel=3)
        return sample


def _observed_copy(gm: fx.GraphModule, ffns, sampler) -> fx.GraphModule:
    """A copy of gm that hands each FFN's input, hidden activation and residual add to the
    sampler."""
    graph = fx.Graph()
    env = {}
    output = graph.graph_copy(gm.graph, env)
    graph.output(output)
    for ffn in ffns:
        args = [env[ffn.x], env[ffn.down.x]]
        after = args[1]
        found = residual_add(gm.graph, ffn.down.node)
        if found is not None:
            args += [env[found[0]], env[found[1]]]
            after = args[3]
        with graph.inserting_after(after):
            graph.call_function(_recorder(sampler, ffn), tuple(args))
    return fx.GraphModule(gm, graph)


_ADDS = {operator.add, operator.iadd, torch.add}
RESIDUAL_SEARCH = 32  # nodes after the FFN output searched for its residual add (past a norm)


def residual_add(graph: fx.Graph, out: fx.Node):
    """(c, a): the first add a = r + c after node `out` where c is computed from `out` and r is
    not (the residual stream), or None."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    derived, nodes = {out}, [out]
    while nodes and len(derived) < RESIDUAL_SEARCH:
        nodes = [u for n in nodes for u in n.users if u not in derived]
        derived.update(nodes)
    for node in sorted(derived, key=order.__getitem__):
        is_add = (node.op == "call_function" and node.target in _ADDS) or (
            node.op == "call_method" and node.target in ("add", "add_"))
        if not is_add or len(node.args) < 2:
            continue
        a, b = node.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        if (a in derived) != (b in derived):
            return (a if a in derived else b), node
    return None


def _recorder(sampler, ffn):
    def record(x, h, contribution=None, total=None):
        sampler.add(ffn, x, h, contribution, total)
    record.__name__ = f"record_{ffn.name.replace('.', '_')}"
    return record


def plan_precision(gm: fx.GraphModule, planned):
    """Autocast to bfloat16 for the plan passes' runs of the graph (calibration, budget and
    temperature checks, distillation) when the weights are float32 and the device multiplies
    bfloat16 matrices natively (CUDA with bf16, CPUs with AMX or AVX512-BF16): SmolLM2's forward
    pass over 2048 tokens took 2.0 s in float32 and 0.63 s so on a 2-core Sapphire Rapids, and
    the KL of those logits to the float32 ones is 0.0015, against check and training losses of
    0.1-0.9. On a 2-core EPYC Genoa calibrate took 20-22 s so against 36-49 s in float32, its
    plans as good within the seed's noise (router_ablation.md, N). The routers' logits and
    selection are computed in float32 inside (no_autocast). Not for graphs that write into
    tensors in place (a static KV cache's index_copy_): bfloat16 results cannot be written into
    their float32 buffers that way; nor for graphs holding a constant bfloat16 cannot represent
    (DeBERTa masks scores with float32's minimum, which overflows bfloat16)."""
    weight = planned[0][1]["w_down"]
    device = weight.device
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = device.type == "cpu" and cpu_multiplies_bf16()
    enabled = (native and weight.dtype == torch.float32 and not writes_in_place(gm)
               and not beyond_bf16(gm))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(enabled))


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively: AMX (Intel Sapphire Rapids and
    later) or AVX512-BF16 (AMD Zen 4 and later). On a 2-core Zen 4 (EPYC Genoa) a bfloat16 product
    of SmolLM2's shapes ran at 300-440 GFLOP/s against 140-200 in float32, and its forward pass
    over 2048 tokens took 2.1 s under autocast against 3.8 s."""
    cpu = torch.cpu
    return any(getattr(cpu, name, bool)() for name in ("_is_amx_tile_supported",
                                                       "_is_avx512_bf16_supported"))


def beyond_bf16(gm: fx.GraphModule) -> bool:
    """Whether a node takes a float constant outside bfloat16's finite range."""
    limit = torch.finfo(torch.bfloat16).max
    return any(isinstance(a, float) and math.isfinite(a) and abs(a) > limit
               for node in gm.graph.nodes for a in (*node.args, *node.kwargs.values()))


def writes_in_place(gm: fx.GraphModule) -> bool:
    """Whether the graph calls an in-place tensor operation other than the functions the passes
    insert."""
    return any(in_place(node) and not _module(node.target).startswith("ppcompile")
               for node in gm.graph.nodes)


def in_place(node: fx.Node) -> bool:
    """A call of an in-place tensor operation: its name ends in one underscore, and it is not
    one of Python's operator functions (`and_` is `&`, which transformers' causal masks put in
    SmolLM2's and Gemma-3's graphs; taking it for a write had turned the bfloat16 runs off)."""
    if node.op not in ("call_method", "call_function"):
        return False
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")
            and _module(target) not in ("operator", "_operator"))


def _module(target) -> str:
    return str(getattr(target, "__module__", "") or "")


def no_autocast(x):
    """Float32 inside a plan_precision run (the routers' logits and selection)."""
    return torch.autocast(x.device.type, enabled=False)
