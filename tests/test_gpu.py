"""The backend on the GPU: sparse-FFN nodes lowered to the Triton kernels through Inductor, weights
re-laid out for the kernels, CUDA graphs, generate() with a static KV cache. Skipped without CUDA
(run on the GPU machine: benchmarks/gpu_session.sh); the CPU side of the same paths is in
test_backend.py and test_generate.py."""
import pytest
import torch
from torch._dynamo.utils import counters

import ppcompile
from conftest import logits_of, rel_err
from ppcompile.ffn import REGISTRY
from ppcompile.passes.lower_to_triton import is_column_major
from tiny_models import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CALIB = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(1))
# 16 tokens: the most the op runs on its kernels (more go to cuBLAS, see DENSE_ABOVE)
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def gpu_model(family="llama", dtype=torch.float32, **overrides):
    config = dict(hidden_size=64, intermediate_size=256, max_position_embeddings=128, **overrides)
    if family == "gpt2":
        config = dict(n_embd=64, n_positions=128, **overrides)
    return tiny_model(family, **config).to("cuda", dtype)


def run(model, ids):
    with torch.no_grad():
        return logits_of(model(ids.cuda()))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_lowered_to_triton_and_dense_at_tau_one(family):
    model = gpu_model(family)
    eager = run(model, IDS)
    compiled = torch.compile(model, backend="prunepath",
                             options={"tau": 1.0, "calibration": CALIB, "expert_size": 16})
    first = run(compiled, IDS)  # runs eagerly, then re-lays out the weights
    assert rel_err(first, eager) < 1e-4
    downs = [m.down_proj.weight for m in model.modules() if hasattr(m, "down_proj")]
    assert all(is_column_major(w) for w in downs), "w_down must be column-major after a call"
    from torch._inductor.utils import run_and_get_code

    # recompiled for the new layout: the sparse graph, then (tau = 1) the dense one it runs
    states = REGISTRY.states_of(list(model.parameters()))
    counted = [float(s.stats[1]) for s in states]
    out, code = run_and_get_code(lambda: run(compiled, IDS))
    assert rel_err(out, eager) < 1e-4
    assert [float(s.stats[1]) for s in states] == counted, "tau = 1 ran the sparse graph"
    source = "\n".join(code)
    assert "_up_kernel" in source and "_router_kernel" in source, "kernels not in Inductor's code"
    assert "sparse_ffn_triton.default(" not in source, "the op is called, not traced into kernels"
    ppcompile.set_tau(compiled, 0.5)
    sparse = run(compiled, IDS)
    assert rel_err(sparse, eager) > 1e-3
    assert all(0 < r["active_fraction"] < 1 for r in ppcompile.report(compiled).rows)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kernels_compute_what_the_reference_op_computes(family, tmp_path, monkeypatch):
    """Below tau = 1 the lowered model (Triton kernels through Inductor) gives the outputs of the
    same plan on the torch reference op (lowering off), on 16 tokens and on one."""
    import copy
    import importlib

    lower_to_triton = importlib.import_module("ppcompile.passes.lower_to_triton")

    model = gpu_model(family)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="prunepath",
                             options={"tau": 0.5, "calibration": CALIB, "expert_size": 16})
    outs = []
    for ids in (IDS, IDS[:1, :1]):
        run(compiled, ids)  # the first call of a shape may run eagerly (relayout)
        outs.append(run(compiled, ids).clone())  # CUDA graph outputs are overwritten later
    path = tmp_path / "plan.safetensors"
    ppcompile.save_plan(compiled, path)
    torch._dynamo.reset()
    monkeypatch.setattr(lower_to_triton, "on_gpu", lambda t: False)
    reference = torch.compile(twin, backend="prunepath", options={"tau": 0.5, "plan": str(path)})
    for ids, out in zip((IDS, IDS[:1, :1]), outs):
        assert rel_err(out, run(reference, ids)) < 1e-4


def test_grad_mode_runs_the_reference_op_and_differentiates():
    """Called with gradients on (the weights require grad), the compiled model keeps the torch
    reference op, which has a backward: the outputs equal the kernels' (the no_grad graph) and
    the FFN weights get gradients."""
    model = gpu_model()
    compiled = torch.compile(model, backend="prunepath",
                             options={"tau": 0.5, "calibration": CALIB, "expert_size": 16})
    run(compiled, IDS)  # the first call of a shape may run eagerly (relayout)
    kernels = run(compiled, IDS).clone()
    with pytest.warns(UserWarning, match="reference op"):
        out = logits_of(compiled(IDS.cuda()))
    assert rel_err(out.detach(), kernels) < 1e-4
    out.float().square().mean().backward()
    down = model.model.layers[0].mlp.down_proj.weight
    assert down.grad is not None and bool(down.grad.isfinite().all()) and down.grad.abs().sum() > 0


def test_planned_on_the_cpu_runs_on_the_gpu():
    """Calibrate on the CPU, then .cuda(): the plan moves with the weights, and the lowered
    model computes what the CPU one did."""
    model = tiny_model("llama", hidden_size=64, intermediate_size=256, max_position_embeddings=128)
    compiled = torch.compile(model, backend="prunepath",
                             options={"tau": 0.5, "calibration": CALIB, "expert_size": 16})
    with torch.no_grad():
        on_cpu = logits_of(compiled(IDS))
    model.cuda()
    run(compiled, IDS)  # the first call of the new device may run eagerly (relayout)
    assert rel_err(run(compiled, IDS).cpu(), on_cpu) < 1e-4
    assert all(s.router_w.is_cuda for s in REGISTRY.states_of(list(model.parameters())))


def test_no_eager_graph_left_when_guards_are_skipped(monkeypatch):
    """A frame's first compile runs eagerly and re-lays out the weights, and dynamo recompiles at
    the next call. Decode loops then skip guards (set_stance(skip_guard_eval_unsafe=True)), and
    dynamo may call the stale eager entry again (GPU_RUNS.md run 43: the prefill of every timed
    generate() ran eagerly): it must compile itself. Eager execution calls the op's Python body;
    compiled code launches the kernels itself."""
    from ppcompile.kernels import gpu_op

    model = gpu_model()
    eager = run(model, IDS)
    compiled = torch.compile(model, backend="prunepath",
                             options={"tau": 1.0, "calibration": CALIB, "expert_size": 16})
    run(compiled, IDS)  # eager, then the relayout
    run(compiled, IDS)  # recompiled for the new layout
    calls = []
    body = gpu_op._sparse_ffn_triton
    monkeypatch.setattr(gpu_op, "_sparse_ffn_triton", lambda *a: calls.append(1) or body(*a))
    with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
        run(compiled, IDS)  # may compile (tracing the body) once
        calls.clear()
        out = run(compiled, IDS)
    assert not calls, f"{len(calls)} sparse-FFN calls ran eagerly with guards skipped"
    assert rel_err(out, eager) < 1e-4


def test_bf16_and_cuda_graphs_follow_tau_without_recompiling():
    model = gpu_model(dtype=torch.bfloat16)
    eager = run(model, IDS).float()
    compiled = torch.compile(model, backend="prunepath",
                             options={"tau": 1.0, "calibration": CALIB, "expert_size": 16})
    for _ in range(3):
        dense = run(compiled, IDS).float()
    assert rel_err(dense, eager) < 2e-2
    graphs = counters["stats"]["unique_graphs"]
    fractions = []
    for tau in (0.9, 0.5, 0.3):
        ppcompile.set_tau(compiled, tau)
        for _ in range(2):
            run(compiled, IDS)
        fractions.append(ppcompile.report(compiled).active_fraction)
    assert counters["stats"]["unique_graphs"] == graphs, "set_tau recompiled"
    assert fractions[0] > fractions[1] > fractions[2] > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # GPT-2: no grouped-query attention
def test_generate_static_cache_same_tokens_as_dense(family):
    from ppcompile.bench import Decoder

    model = gpu_model(family, dtype=torch.bfloat16)
    decoder = Decoder(model, prompt_len=8, new_tokens=16)
    prompt = IDS.cuda()
    dense = decoder.generate(prompt, 16)
    model.forward = torch.compile(model.forward, backend="prunepath",
                                  options={"tau": 1.0, "calibration": CALIB, "expert_size": 16})
    # the first call re-lays out the weights for the kernels: the next one recompiles once
    assert torch.equal(decoder.generate(prompt, 16), dense)
    assert torch.equal(decoder.generate(prompt, 16), dense)
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(decoder.generate(prompt, 16), dense)
    assert counters["stats"]["unique_graphs"] == graphs, "generate() recompiled"
    ppcompile.set_tau(model, 0.5)
    decoder.generate(prompt, 16)
    assert counters["stats"]["unique_graphs"] == graphs, "set_tau between generate() recompiled"
    assert ppcompile.report(model).active_fraction < 1
    assert decoder.gpu_step_ms(prompt, steps=4) > 0  # the benchmark's GPU time per step


def test_prompt_lengths_share_one_prefill_graph():
    """Past 16 tokens the op guards only on "more than 16": once dynamo has made the prefill
    graph dynamic (second prompt length), new prompt lengths reuse it."""
    from ppcompile.bench import Decoder

    model = gpu_model(dtype=torch.bfloat16)
    decoder = Decoder(model, prompt_len=40, new_tokens=4)
    model.forward = torch.compile(model.forward, backend="prunepath",
                                  options={"tau": 0.7, "calibration": CALIB.repeat(1, 4),
                                           "expert_size": 16})
    # token 0 is the pad token: a prompt holding it makes generate() pass an attention mask (a
    # different call signature, so a different graph)
    prompts = [torch.randint(1, 128, (1, n), device="cuda") for n in (20, 24, 28, 36)]
    for prompt in prompts[:2]:  # the second length makes the prefill graph dynamic
        decoder.generate(prompt, 4)
        decoder.generate(prompt, 4)  # after the weights' relayout
    graphs = counters["stats"]["unique_graphs"]
    for prompt in prompts[2:]:
        decoder.generate(prompt, 4)
    assert counters["stats"]["unique_graphs"] == graphs, "a new prompt length recompiled"
