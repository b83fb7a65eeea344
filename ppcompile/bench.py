"""End-to-end decoding benchmark: Hugging Face generate() with a static KV cache, dense
torch.compile (Inductor, CUDA graphs) against backend="prunepath" at several active fractions.

Used by benchmarks/decode.py (Llama shapes with random weights) and `ppcompile bench` (any causal
LM). The supported way to decode under the backend, as done here:

    model.forward = torch.compile(model.forward, backend="prunepath", options={...})
    cache = StaticCache(config=model.config, max_cache_len=L)
    cache.early_initialization(batch_size=B, num_heads=..., head_dim=..., dtype=..., device=...)
    model.generate(ids, past_key_values=cache, disable_compile=True)  # cache.reset() to reuse
    # disable_compile: HF would otherwise wrap forward in its own compile

Measures, per batch size: decode tokens/s (new tokens after the first, over the time they take:
a generate() of N new tokens minus one of 1 new token), peak GPU memory of a generate(), the
active fraction measured during it, and the ideal speed-up 1 / (1 - f (1 - a)), f being the FFNs'
share of the weight bytes read per decoded token. `a` is counted over decode steps only (the
prompt's prefill left out), and at batch > 1 it is the measured union of the experts the
batch's tokens keep (the weights the step must read). Also the GPU time per step
(kernels only, torch.profiler): generate() adds host time per token that no FFN kernel removes,
so the ideal is compared with both.
"""
from __future__ import annotations

import contextlib
import gc
import time

import torch

import ppcompile
from .ffn import REGISTRY
from .kernels.reference import keep_mask

LLAMA_SHAPES = {  # public configs of meta-llama/Llama-3.2-1B, Meta-Llama-3-8B, SmolLM2-135M
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                      tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      tie_word_embeddings=False),
    # launch-bound: its 576x1536 FFNs run on the program-per-expert kernel
    # (named apart from "smollm2-135m", which `ppcompile demo` fetches with its real weights)
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                               tie_word_embeddings=True, vocab_size=49152,
                               rope_theta=100000.0, bos_token_id=1, eos_token_id=2),
}


def random_llama(name: str, dtype=torch.bfloat16, device="cuda", layers: int | None = None):
    """A LlamaForCausalLM of a real model's shape with random weights (HF's initialisation);
    layers: fewer decoder layers than the real model (the per-layer kernels are the same)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"vocab_size": 128256, "rope_theta": 500000.0, "bos_token_id": 128000,
             "eos_token_id": 128001, **LLAMA_SHAPES[name]}
    if layers is not None:
        shape["num_hidden_layers"] = layers
    config = LlamaConfig(max_position_embeddings=8192, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


@contextlib.contextmanager
def _as_timed():
    """Warm graphs only: dynamo then checks just the guards that tell its graphs apart (prefill /
    decode), for dense and sparse alike (a decode step of a 1B model spent ~2.6 ms on the host
    against ~1 ms of weight reads on an H100); the GPU is idle on entry and done on exit. Python's
    cyclic garbage collector runs before, not during (as timeit does): after Inductor compiles an
    8B model's graphs the heap holds millions of objects, and a full collection's pause would be
    charged to the one generate() it fell in."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            torch.cuda.synchronize()
            yield
            torch.cuda.synchronize()
    finally:
        if enabled:
            gc.enable()


# the longest generate() Decoder runs on its own (host_profile; gpu_step_ms runs 33 tokens,
# decode_fraction 17): its KV cache holds that many new tokens, whatever new_tokens is
OWN_NEW_TOKENS = 65


class Decoder:
    """Times generate() on one model with one compiled forward."""

    def __init__(self, model, prompt_len: int, new_tokens: int):
        if new_tokens < 2:  # tokens/s counts the steps after the first token
            raise ValueError(f"new_tokens must be >= 2 (decode steps are timed), got {new_tokens}")
        self.model, self.prompt_len, self.new_tokens = model, prompt_len, new_tokens
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None  # random weights: never stop early
        self.caches = {}

    def cache(self, batch: int):
        """One static KV cache per batch size, allocated before the first compiled call and
        reset between generate() calls: its tensors keep their addresses (CUDA graphs replay
        on them), and a cache first allocated inside a compiled graph would be a CUDA-graph
        output, overwritten by the next replay."""
        from transformers import StaticCache

        cache = self.caches.get(batch)
        if cache is None:
            config = self.model.config
            text = config.get_text_config()
            heads = text.num_attention_heads
            cache = StaticCache(config=config, max_cache_len=self.prompt_len
                                + max(self.new_tokens, OWN_NEW_TOKENS))
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
            # configs without grouped-query attention (GPT-2, OPT, ...) have no num_key_value_heads
            kv_heads = getattr(text, "num_key_value_heads", None) or heads
            cache.early_initialization(batch_size=batch, num_heads=kv_heads,
                                       head_dim=head_dim, dtype=self.model.dtype,
                                       device=self.model.device)
            self.caches[batch] = cache
        else:
            cache.reset()
        return cache

    def generate(self, prompt, new_tokens):
        with torch.no_grad():
            return self.model.generate(prompt, past_key_values=self.cache(prompt.shape[0]),
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False, disable_compile=True)

    def timed(self, prompt, new_tokens) -> float:
        with _as_timed():
            start = time.perf_counter()
            self.generate(prompt, new_tokens)
        return time.perf_counter() - start

    def measure(self, prompt, repeats: int = 3) -> dict:
        """Decode tokens/s (median over repeats) and peak memory of one full generate()."""
        self.generate(prompt, self.new_tokens)  # warm: compiles, CUDA graph recording
        self.generate(prompt, self.new_tokens)
        self.timed(prompt, self.new_tokens)  # and as timed: the entries dynamo picks without guards
        torch.cuda.reset_peak_memory_stats()
        full = [self.timed(prompt, self.new_tokens) for _ in range(repeats)]
        peak = torch.cuda.max_memory_allocated() / 1e9
        first = [self.timed(prompt, 1) for _ in range(repeats)]
        decode_s = sorted(full)[repeats // 2] - sorted(first)[repeats // 2]
        batch = prompt.shape[0]
        return dict(tokens_per_s=batch * (self.new_tokens - 1) / decode_s, peak_mem_gb=peak,
                    generate_s=sorted(full)[repeats // 2],
                    step_ms=1e3 * decode_s / (self.new_tokens - 1),
                    gpu_step_ms=self.gpu_step_ms(prompt))

    def host_profile(self, prompt, path, new_tokens: int = OWN_NEW_TOKENS):
        """cProfile of a warm generate() of `new_tokens` tokens (as timed: guards skipped), top
        functions by own and by cumulative time, into the text file `path`: where the host's
        share of a decode step goes (the step's wall time minus its GPU time)."""
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        with _as_timed():
            profiler.enable()
            self.generate(prompt, new_tokens)
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        for order in ("tottime", "cumulative"):
            stats.sort_stats(order).print_stats(45)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"generate() of {new_tokens} new tokens, batch {prompt.shape[0]}\n"
                        + text.getvalue())

    def gpu_step_ms(self, prompt, steps: int = 32) -> float | None:
        """GPU time of one decode step: the summed time of the CUDA kernels (torch.profiler) of a
        generate() of 1 + steps new tokens, minus that of 1 new token, over steps. Unlike the step's
        wall time it leaves out the host's share (generate()'s Python and a sync per token, which
        the GPU waits for), so dense vs sparse on it is what the ideal speed-up predicts.
        None if the profiler saw no kernels (CUDA-graph replays it cannot see)."""
        try:
            step_us = sum(us for _, us in self.step_kernels(prompt, steps).values())
        except RuntimeError:  # a profiler that cannot start here: leave the field empty
            return None
        return step_us / 1e3 if step_us > 0 else None

    def profiled(self, prompt, new_tokens):
        """torch.profiler's record (CUDA activity) of one generate() of new_tokens tokens."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self.generate(prompt, new_tokens)
            torch.cuda.synchronize()
        return prof

    def step_kernels(self, prompt, steps: int = 32) -> dict:
        """{kernel name: [calls, microseconds]} per decode step, as gpu_step_ms measures it."""
        def per_name(new_tokens):
            return {e.key: (e.count, getattr(e, "self_device_time_total", 0.0))
                    for e in self.profiled(prompt, new_tokens).key_averages()}

        long, short = per_name(1 + steps), per_name(1)
        none = (0, 0.0)
        return {k: [(long.get(k, none)[0] - short.get(k, none)[0]) / steps,
                    (long.get(k, none)[1] - short.get(k, none)[1]) / steps]
                for k in long.keys() | short.keys()}


def ffn_byte_share(model) -> float:
    """f: the FFN weights' share of the weight bytes one decode step reads (every parameter,
    except an input embedding table that is not also the output head: it is only gathered)."""
    params = {id(p): p for p in model.parameters()}
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight is not embed:
        params.pop(id(embed), None)
    total = sum(p.numel() * p.element_size() for p in params.values())
    ffn = 0
    for up, down, state in REGISTRY.entries_of(model.parameters()):
        width = 3 if state.kind in ("swiglu", "geglu", "reglu") else 2
        ffn += width * state.d_model * state.d_ff * down.element_size()
    return ffn / total


def union_fraction(model, batch: int, vocab: int, positions: int = 16) -> float:
    """Measured share of experts that at least one of `batch` tokens keeps, at the current tau:
    the FFN inputs of a forward pass over random tokens, routed by each FFN's router."""
    entries = REGISTRY.entries_of(model.parameters())
    modules = {id(m.weight): m for m in model.modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor)}
    inputs, hooks = {}, []
    for up, _, state in entries:
        module = modules[id(up)]
        hooks.append(module.register_forward_hook(
            lambda mod, args, out, state=state: inputs.__setitem__(state.name, args[0])))
    ids = torch.randint(0, vocab, (batch, positions), device=entries[0][0].device,
                        generator=torch.Generator(entries[0][0].device).manual_seed(1))
    forward = getattr(model.forward, "_torchdynamo_orig_callable", model.forward)
    try:
        with torch.no_grad():
            forward(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    kept, total = 0.0, 0
    for up, down, state in entries:
        x = inputs[state.name].reshape(-1, state.d_model)
        keep = keep_mask("prunepath", x, None, down, state.router_w, state.router_b, state.tau,
                         state.expert_size).reshape(batch, positions, -1)
        kept += keep.any(dim=0).float().mean().item() * state.d_ff
        total += state.d_ff
    return kept / total


def decode_fraction(decoder, prompt, steps: int = 16) -> float:
    """Active fraction of the decode steps alone, at the current tau: the FFN statistics of a
    generate() of 1 + steps new tokens minus those of one new token (the prefill, whose prompt
    tokens would otherwise make up most of the count). Resets the statistics."""
    decoder.generate(prompt, 1)  # a model compiled but not yet called has no sparse FFN
    states = REGISTRY.states_of(decoder.model.parameters())

    def totals(new_tokens):
        for state in states:
            state.stats.zero_()
        decoder.generate(prompt, new_tokens)
        return [state.stats.tolist() for state in states]

    short, long = totals(1), totals(1 + steps)
    active = sum(l[0] - s[0] for l, s in zip(long, short))
    slots = sum((l[1] - s[1]) * state.d_ff for l, s, state in zip(long, short, states))
    if slots <= 0:
        raise RuntimeError("bench.decode_fraction: the decode steps counted no FFN tokens "
                           "(is the model compiled with the prunepath backend, tau < 1?)")
    return active / slots


def tau_for_fraction(decoder, prompt, target: float, steps: int = 8) -> tuple[float, float]:
    """Bisect tau so that the decode steps keep `target` of the FFN neurons; (tau, measured
    fraction)."""
    if target >= 1.0:
        return 1.0, 1.0
    lo, hi, best = 0.0, 1.0, (1.0, 1.0)
    for _ in range(steps):
        tau = (lo + hi) / 2
        ppcompile.set_tau(decoder.model, tau)
        fraction = decode_fraction(decoder, prompt)
        if abs(fraction - target) < abs(best[1] - target):
            best = (tau, fraction)
        lo, hi = (tau, hi) if fraction < target else (lo, tau)
    return best


def run(model, name: str, batches, fractions, prompt_len=128, new_tokens=256, calibration=None,
        expert_size=16, log=print, on_record=None, host_profile_dir=None) -> list[dict]:
    """Dense then prunepath records for `model` (on CUDA), one per (batch, fraction);
    on_record(records) is called after each one (to save partial results); host_profile_dir:
    also a cProfile of one generate() per record, and of the dense one (Decoder.host_profile)."""
    gpu = torch.cuda.get_device_name()
    vocab = model.config.vocab_size
    gen = torch.Generator("cuda").manual_seed(0)
    prompts = {b: torch.randint(0, vocab, (b, prompt_len), device="cuda", generator=gen)
               for b in batches}
    forward = model.forward
    decoder = Decoder(model, prompt_len, new_tokens)
    if hasattr(torch.profiler._utils, "_init_for_cuda_graphs"):
        # the profiler sees replays of CUDA graphs only if it was started before their capture
        torch.profiler._utils._init_for_cuda_graphs()

    def allocated(when):  # where the sparse run's extra memory comes from
        log(f"{name}: {torch.cuda.memory_allocated() / 1e9:.3f} GB allocated {when}")

    for b in batches:  # every KV cache exists before any peak is taken, dense or sparse
        decoder.cache(b)
    allocated("before compiling (weights and KV caches)")
    dense = {}
    model.forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
    for b in batches:
        start = time.perf_counter()
        dense[b] = decoder.measure(prompts[b])
        if host_profile_dir is not None:
            decoder.host_profile(prompts[b], host_profile_dir / f"{name}_b{b}_dense.txt")
        allocated(f"after measuring dense batch {b}")
        log(f"{name} batch {b} dense: {dense[b]['tokens_per_s']:.1f} tokens/s, "
            f"peak {dense[b]['peak_mem_gb']:.2f} GB, step {dense[b]['step_ms']:.2f} ms, GPU time "
            f"{dense[b]['gpu_step_ms']} ms ({time.perf_counter() - start:.0f} s with compiling)")
    torch._dynamo.reset()
    allocated("after dropping the dense graphs")

    # random tokens say nothing a router could learn end to end: no distillation on them
    distill = {}
    if calibration is None:
        calibration = torch.randint(0, vocab, (64, prompt_len), device="cuda", generator=gen)
        distill = dict(distill_epochs=0)
    start = time.perf_counter()
    model.forward = torch.compile(forward, backend="prunepath", options=dict(
        tau=1.0, calibration=calibration, expert_size=expert_size, calibration_tokens=2048,
        **distill))
    decoder.generate(prompts[batches[0]], 2)
    log(f"{name}: prunepath plan and first compile {time.perf_counter() - start:.0f} s")
    allocated("after the plan (routers included)")
    share = ffn_byte_share(model)
    router_gb = sum(s.router_w.numel() * s.router_w.element_size()
                    for s in REGISTRY.states_of(model.parameters())) / 1e9
    records = []
    for target in fractions:
        start = time.perf_counter()
        tau, _ = tau_for_fraction(decoder, prompts[batches[0]], target)
        log(f"{name}: tau {tau:.4f} for {target} active ({time.perf_counter() - start:.0f} s)")
        for b in batches:
            ppcompile.set_tau(model, tau)
            result = decoder.measure(prompts[b])
            if host_profile_dir is not None:
                decoder.host_profile(prompts[b], host_profile_dir / f"{name}_b{b}_a{target}.txt")
            allocated(f"after measuring batch {b}")
            active = 1.0 if tau >= 1.0 else decode_fraction(decoder, prompts[b])
            union = active if b == 1 else union_fraction(model, b, vocab)
            ideal = 1.0 / (1.0 - share * (1.0 - union))
            speedup = result["tokens_per_s"] / dense[b]["tokens_per_s"]
            records.append(dict(
                model=name, batch=b, active_fraction=round(active, 4), tau=round(tau, 5),
                expert_size=expert_size,
                union_fraction=round(union, 4), tokens_per_s=round(result["tokens_per_s"], 2),
                dense_tokens_per_s=round(dense[b]["tokens_per_s"], 2),
                speedup=round(speedup, 4), ideal_speedup=round(ideal, 4),
                step_ms=round(result["step_ms"], 3), dense_step_ms=round(dense[b]["step_ms"], 3),
                gpu_step_ms=_round(result["gpu_step_ms"], 3),
                dense_gpu_step_ms=_round(dense[b]["gpu_step_ms"], 3),
                gpu_speedup=_round(_ratio(dense[b]["gpu_step_ms"], result["gpu_step_ms"]), 4),
                share_of_ideal=round(speedup / ideal, 4), ffn_byte_share=round(share, 4),
                peak_mem_gb=round(result["peak_mem_gb"], 3),
                dense_peak_mem_gb=round(dense[b]["peak_mem_gb"], 3),
                router_gb=round(router_gb, 3), gpu=gpu))
            log(f"{name} batch {b} a={active:.3f} (union {union:.3f}, tau {tau:.4f}): "
                f"{result['tokens_per_s']:.1f} tokens/s = {speedup:.2f}x dense, ideal "
                f"{ideal:.2f}x, peak {result['peak_mem_gb']:.2f} GB; step {result['step_ms']:.2f} "
                f"ms (dense {dense[b]['step_ms']:.2f}), GPU time {result['gpu_step_ms']} ms "
                f"(dense {dense[b]['gpu_step_ms']})")
            if on_record is not None:
                on_record(records)
    model.forward = forward
    return records


def _ratio(a, b):
    return a / b if a is not None and b is not None else None


def _round(x, digits):
    return round(x, digits) if x is not None else None


def configure_dynamo():
    """Static shapes per prompt length and batch (the GPU kernels pick their launch plan from
    the token count), and room for the prefill and decode graphs of several batch sizes."""
    torch._dynamo.config.automatic_dynamic_shapes = False
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)


def table(records) -> str:
    from tabulate import tabulate

    keys = ["model", "batch", "active_fraction", "union_fraction", "tokens_per_s",
            "dense_tokens_per_s", "speedup", "ideal_speedup", "share_of_ideal", "gpu_speedup",
            "peak_mem_gb", "dense_peak_mem_gb"]
    return tabulate([[r.get(k) for k in keys] for r in records], headers=keys, floatfmt=".3f")
