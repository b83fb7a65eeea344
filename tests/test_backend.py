"""End to end through torch.compile(backend="prunepath") with Inductor on tiny random models of
every supported family."""
import importlib
import re
import warnings

import pytest
import torch

import ppcompile
import ppcompile.backend
from conftest import logits_of, rel_err
from ppcompile.ffn import REGISTRY, SparseFFN
from tiny_models import FAMILIES, tiny_model

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 128, (24, 32), generator=torch.Generator().manual_seed(1))


def compile_model(model, **options):
    opts = {"tau": 1.0, "calibration": CALIB, "expert_size": 8, **options}
    return torch.compile(model, backend="prunepath", options=opts)


def run(model, ids=IDS):
    with torch.no_grad():
        return logits_of(model(ids))


def sparse_graph_only(monkeypatch):
    """Make the backend run its sparse graph at tau >= 1 too (it runs the dense graph there)."""
    monkeypatch.setattr(SparseFFN, "keeps_all", property(lambda self: False))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_dense_at_tau_one_and_sparse_below(family, monkeypatch):
    model = tiny_model(family)
    eager = run(model)
    compiled = compile_model(model)
    assert rel_err(run(compiled), eager) < 1e-4
    with monkeypatch.context() as patch:  # the sparse graph keeps every expert at tau = 1 too
        sparse_graph_only(patch)
        assert rel_err(run(compiled), eager) < 1e-4
        states = REGISTRY.states_of(list(model.parameters()))
        assert all(s.stats[1] == IDS.numel() for s in states), "the sparse-FFN ops did not run"
    rows = ppcompile.report(compiled).rows
    assert len(rows) == 2 and all(r["active_fraction"] == 1.0 for r in rows)
    assert {r["kind"] for r in rows} == {FAMILIES[family][3]}
    assert set(rows[0]) >= {"name", "kind", "d_model", "d_ff", "num_experts", "active_fraction"}

    ppcompile.set_tau(compiled, 0.5)
    assert all(r["active_fraction"] is None for r in ppcompile.report(compiled).rows)
    sparse = run(compiled)
    assert rel_err(sparse, eager) > 1e-3
    assert all(0 < r["active_fraction"] < 1 for r in ppcompile.report(compiled).rows)
    # the eager model is still the dense model (weights were only permuted)
    assert rel_err(run(model), eager) < 1e-5


def test_tau_one_runs_the_dense_graph():
    """Every expert is kept at tau >= 1: the backend calls the dense graph (no sparse-FFN op runs,
    so nothing is counted) and returns to the sparse graph below 1."""
    model = tiny_model("llama")
    eager = run(model)
    compiled = compile_model(model)
    states = REGISTRY.states_of(list(model.parameters()))
    assert rel_err(run(compiled), eager) < 1e-4
    assert all(s.stats[1] == 0 for s in states)
    ppcompile.set_tau(compiled, 0.5)
    sparse = run(compiled)
    assert all(s.stats[1] == IDS.numel() for s in states)
    assert rel_err(sparse, eager) > 1e-3
    ppcompile.set_tau(compiled, 1.0)
    assert rel_err(run(compiled), eager) < 1e-4
    assert all(s.stats[1] == 0 for s in states)
    assert ppcompile.report(compiled).active_fraction == 1.0


def test_report_shows_an_ffn_tau_only_where_prunepath_reads_it():
    """topk, static and oracle read the model-wide tau; the per-FFN threshold is prunepath's."""
    model = tiny_model("llama")
    run(compile_model(model, tau=0.5, method="topk", distill_epochs=0))
    rows = ppcompile.report(model).rows
    assert rows and all(r["ffn_tau"] is None and r["tau"] == 0.5 for r in rows)
    assert "ffn_tau" in str(ppcompile.report(model))
    torch._dynamo.reset()
    run(compile_model(model, tau=0.5, distill_epochs=0))  # the same plan, under prunepath
    assert all(isinstance(r["ffn_tau"], float) for r in ppcompile.report(model).rows)


def test_set_tau_and_new_lengths_do_not_recalibrate(monkeypatch):
    model = tiny_model("llama")
    compiled = compile_model(model)
    calls = []
    module = importlib.import_module("ppcompile.passes.calibrate")
    real = module.calibration_batches
    monkeypatch.setattr(module, "calibration_batches", lambda *a: calls.append(1) or real(*a))
    compiles = []
    inner = ppcompile.backend.inner_compile
    monkeypatch.setattr(ppcompile.backend, "inner_compile", lambda *a: compiles.append(1) or inner(*a))
    run(compiled)  # tau = 1: the sparse graph is compiled, and the dense one it runs instead
    assert len(calls) == 1 and len(compiles) == 2
    for tau in (0.9, 0.5, 0.7, 1.0, 0.6):
        ppcompile.set_tau(compiled, tau)
        run(compiled)
    assert len(compiles) == 2, "set_tau must not recompile"
    # prefill then decode shapes: recompiles for shapes, never calibrates again
    for length in (1, 5, 9):
        ids = IDS[:1, :length]
        ppcompile.set_tau(compiled, 1.0)
        assert rel_err(run(compiled, ids), run(model, ids)) < 1e-4
    assert len(calls) == 1


def test_compiling_the_same_model_twice_reuses_its_plan():
    model = tiny_model("qwen2")
    eager = run(model)
    first = compile_model(model, tau=0.6)
    run(first)
    perm = [s.perm.clone() for s in REGISTRY.states_of(list(model.parameters()))]
    torch._dynamo.reset()
    second = compile_model(model, tau=1.0)
    assert rel_err(run(second), eager) < 1e-4  # permutation was not applied twice
    assert [s.perm for s in REGISTRY.states_of(list(model.parameters()))][0].equal(perm[0])
    assert ppcompile.report(second).rows[0]["tau"] == 1.0


def test_plan_cache_serves_the_same_weights_until_the_planner_changes(monkeypatch):
    """A fresh copy of a planned model compiles from the plan cache without calibrating, with
    the same outputs; a plan cached by other planning code is not reused."""
    out = run(compile_model(tiny_model("llama"), tau=0.6))
    calls = []
    module = importlib.import_module("ppcompile.passes.calibrate")
    real = module.calibration_batches
    monkeypatch.setattr(module, "calibration_batches", lambda *a: calls.append(1) or real(*a))
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cached plan needs no calibration data: no warning
        cached = torch.compile(tiny_model("llama"), backend="prunepath",
                               options={"tau": 0.6, "expert_size": 8})
        assert rel_err(run(cached), out) < 1e-5
    assert calls == []
    # no options at all: the cached plan runs at the default tau, not at the plan's
    torch._dynamo.reset()
    bare = torch.compile(tiny_model("llama"), backend="prunepath")
    run(bare)
    assert calls == []
    assert {r["tau"] for r in ppcompile.report(bare).rows} == {ppcompile.Options().tau}
    monkeypatch.setattr(ppcompile.plan, "planner_version", lambda: "other-code")
    torch._dynamo.reset()
    run(compile_model(tiny_model("llama"), tau=0.6))
    assert calls == [1]


def shuffle_neurons_(model, seed=0):
    """Reorder every Llama FFN's neurons: the same dense model, another neuron order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            perm = torch.randperm(mlp.up_proj.weight.shape[0], generator=g)
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight.copy_(lin.weight[perm])
            mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])


def planned_and_saved(tmp_path, tau=0.6):
    """A tiny Llama compiled and run at tau, its plan saved: (model, output, plan path)."""
    model = tiny_model("llama")
    compiled = compile_model(model, tau=tau)
    out = run(compiled)
    path = tmp_path / "plan.safetensors"
    ppcompile.save_plan(compiled, path)
    return model, out, path


@pytest.mark.parametrize("order", ["planned", "original", "shuffled"])
@pytest.mark.parametrize("source", ["cache", "plan_file"])
def test_plan_applies_to_weights_in_any_neuron_order(tmp_path, order, source):
    """Weights saved after a compile are in the plan's order (it permutes them in place); loaded
    into a fresh model, from the cache or a plan file, they must not be permuted again. Any
    other order of the same weights is found and put in the plan's."""
    model, out, path = planned_and_saved(tmp_path)
    fresh = tiny_model("llama")
    if order == "planned":
        fresh.load_state_dict(model.state_dict())
    elif order == "shuffled":
        shuffle_neurons_(fresh)
    torch._dynamo.reset()
    options = {"tau": 0.6, "expert_size": 8, **({"plan": str(path)} if source == "plan_file" else {})}
    again = torch.compile(fresh, backend="prunepath", options=options)
    assert rel_err(run(again), out) < 1e-5
    for a, b in zip(model.model.layers, fresh.model.layers):
        assert torch.equal(a.mlp.up_proj.weight, b.mlp.up_proj.weight)


def test_a_plan_file_that_does_not_fit_is_refused_naming_what_differs(tmp_path):
    _, _, path = planned_and_saved(tmp_path)
    for model, words in [(tiny_model("llama", seed=1), "made for other weights.*per-neuron"),
                         (tiny_model("qwen2"), "has no FFN named|made for other weights"),
                         (tiny_model("gpt2"), "has no FFN named.*made for another model")]:
        torch._dynamo.reset()
        again = torch.compile(model, backend="prunepath", options={"plan": str(path)})
        with pytest.raises(Exception, match=words):
            run(again)


def test_a_hand_edited_plan_file_is_refused_naming_the_damage(tmp_path):
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, _, path = planned_and_saved(tmp_path)
    for damage, words in [("entry", "FFN entry 0 lacks one of"),
                          ("router", "tensor '0.router_w' .* has shape \\(4, 32\\)"),
                          ("tensor", "tensor '1.signature' .* is missing"),
                          ("options", "its header's 'options' is not a mapping")]:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads(f.metadata()["ppcompile"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if damage == "entry":
            del header["ffns"][0]["expert_size"]
        elif damage == "router":
            tensors["0.router_w"] = tensors["0.router_w"][:4].contiguous()
        elif damage == "tensor":
            del tensors["1.signature"]
        else:
            header["options"] = "x"
        edited = tmp_path / f"{damage}.safetensors"
        save_file(tensors, str(edited), metadata={"ppcompile": json.dumps(header)})
        torch._dynamo.reset()
        again = torch.compile(tiny_model("llama"), backend="prunepath",
                              options={"plan": str(edited)})
        with pytest.raises(Exception, match="option 'plan': .* is damaged: " + words):
            run(again)


def test_a_plan_serves_the_model_compiled_another_way(tmp_path):
    """A plan saved from torch.compile(model) names the FFNs 'model.layers.0.mlp', ...; a
    function around the model `fresh` names them 'fresh.model.layers.0.mlp', ...: the same."""
    _, out, path = planned_and_saved(tmp_path)
    fresh = tiny_model("llama")
    torch._dynamo.reset()
    again = torch.compile(lambda ids: fresh(ids), backend="prunepath",
                          options={"tau": 0.6, "plan": str(path), "calibration": CALIB})
    with pytest.warns(UserWarning, match="'calibration' is not used"):
        assert rel_err(run(again), out) < 1e-5


class BufferFFN(torch.nn.Module):
    """An FFN whose weights are buffers, not parameters."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w_up", torch.randn(64, 32, generator=g) / 32 ** 0.5)
        self.register_buffer("w_down", torch.randn(32, 64, generator=g) / 8)

    def forward(self, x):
        return x + torch.nn.functional.linear(
            torch.relu(torch.nn.functional.linear(x, self.w_up)), self.w_down)


def test_report_and_set_tau_see_ffns_whose_weights_are_buffers():
    module, x = BufferFFN(), torch.randn(2, 8, 32)
    compiled = torch.compile(module, backend="prunepath", options={
        "tau": 0.5, "expert_size": 8, "calibration": torch.randn(32, 8, 32)})
    with torch.no_grad():
        compiled(x)
    rows = ppcompile.report(compiled).rows
    assert len(rows) == 1 and 0 < rows[0]["active_fraction"] < 1
    ppcompile.set_tau(compiled, 1.0)
    with torch.no_grad():
        assert rel_err(compiled(x), module(x)) < 1e-5
    with pytest.raises(TypeError, match="pass the model"):
        ppcompile.report(module.forward)


def test_weights_loaded_into_a_compiled_model_are_checked_at_the_next_compile():
    """load_state_dict writes into the tensors a plan is registered by: the next compile puts the
    same weights back in the plan's order, and plans other weights anew."""
    model = tiny_model("llama")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    out = run(compile_model(model, tau=0.6))
    model.load_state_dict(original)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="permuted back"):
        assert rel_err(run(compile_model(model, tau=0.6)), out) < 1e-5
    other = tiny_model("llama", seed=1)
    model.load_state_dict(other.state_dict())
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="planning it again"):
        compiled = compile_model(model, tau=1.0)
        assert rel_err(run(compiled), run(other)) < 1e-4


def test_weights_replaced_in_a_compiled_model_are_refused_until_it_compiles_again():
    """load_state_dict into a compiled model writes into the tensors its graph runs with: the
    next call refuses them (the plan's order is gone), while a training-sized update passes."""
    model = tiny_model("llama")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = compile_model(model, tau=0.6)
    out = run(compiled)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(1 + 1e-3)  # a small step: still its plan's weights
    run(compiled)
    model.load_state_dict(original)
    with pytest.raises(RuntimeError, match="replaced in place.*Compile again"):
        run(compiled)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="permuted back"):
        assert rel_err(run(compile_model(model, tau=0.6)), out) < 1e-5


def test_encoder_decoder_with_other_lengths_calibrates_each_side():
    """T5's encoder and decoder FFNs see different token counts per batch. The calibration data
    feeds the encoder's input_ids; the decoder's FFNs are calibrated with the call's
    decoder_input_ids (one graph, torch 2.13) or on the call's inputs (torch 2.11 breaks the
    graph before the decoder, whose graph takes no token ids); a warning says which."""
    import transformers as T

    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(T.T5Config(
        d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=128,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    dec = IDS[:, :8].clone()
    with torch.no_grad():
        want = model(input_ids=IDS, decoder_input_ids=dec).logits
    with pytest.warns(UserWarning, match="decoder_input_ids|this call's inputs"):
        compiled = compile_model(model, tau=1.0)
        with torch.no_grad():
            got = compiled(input_ids=IDS, decoder_input_ids=dec).logits
    assert rel_err(got, want) < 1e-4
    assert len(ppcompile.report(compiled).rows) == 4
    ppcompile.set_tau(compiled, 0.5)
    with torch.no_grad():
        assert compiled(input_ids=IDS, decoder_input_ids=dec).logits.isfinite().all()


def test_plan_cache_tells_architectures_apart(monkeypatch):
    """The same weights in another architecture (a parallel residual) feed the FFNs other inputs:
    the cache does not hand one's plan to the other."""
    calls = []
    module = importlib.import_module("ppcompile.passes.calibrate")
    real = module.calibration_batches
    monkeypatch.setattr(module, "calibration_batches", lambda *a: calls.append(1) or real(*a))
    for parallel in (False, True):
        torch._dynamo.reset()
        run(compile_model(tiny_model("gpt_neox", use_parallel_residual=parallel), tau=0.6))
    assert calls == [1, 1]


def test_plan_cache_tells_buffers_and_constants_apart_but_not_lengths(monkeypatch):
    """The same parameters with other rotary frequencies (a buffer) or another norm epsilon (a
    constant of the graph) feed the FFNs other inputs: planned anew. Another input length (ints
    of the graph) is the same model: served from the cache."""
    calls = []
    module = importlib.import_module("ppcompile.passes.calibrate")
    real = module.calibration_batches
    monkeypatch.setattr(module, "calibration_batches", lambda *a: calls.append(1) or real(*a))
    for config, ids in [({}, IDS), ({"rope_theta": 1e6}, IDS), ({"rms_norm_eps": 1e-2}, IDS),
                        ({}, IDS[:, :8])]:
        torch._dynamo.reset()
        run(compile_model(tiny_model("llama", **config), tau=0.6, distill_epochs=0), ids)
    assert calls == [1, 1, 1]


def test_a_damaged_cached_plan_is_ignored_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("PPCOMPILE_CACHE_DIR", str(tmp_path))
    run(compile_model(tiny_model("llama"), tau=0.6))
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert files
    for f in files:
        f.write_bytes(b"not a plan")
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="ignoring an unreadable cached plan.*not a readable"):
        compiled = compile_model(tiny_model("llama"), tau=0.6)
        run(compiled)
    assert 0 < ppcompile.report(compiled).active_fraction < 1


def test_an_unwritable_plan_cache_warns_and_the_compile_goes_on(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("PPCOMPILE_CACHE_DIR", str(blocker / "plans"))  # under a file
    model = tiny_model("llama")
    eager = run(model)
    with pytest.warns(UserWarning, match="could not store the plan in the plan cache"):
        compiled = compile_model(model, tau=0.6)
        sparse = run(compiled)
    assert rel_err(sparse, eager) > 1e-3  # planned and running sparse
    assert list(tmp_path.iterdir()) == [blocker]


def test_new_plan_options_replan_and_stay_exact():
    model = tiny_model("llama")
    eager = run(model)
    run(compile_model(model, expert_size=8))
    torch._dynamo.reset()
    compiled = compile_model(model, expert_size=16)
    assert rel_err(run(compiled), eager) < 1e-4
    assert [r["num_experts"] for r in ppcompile.report(compiled).rows] == [4, 4]


def test_single_layers_compile_with_hidden_state_calibration():
    model = tiny_model("llama")
    layers = model.model.layers
    hidden = torch.randn(2, 16, 32)
    calib = torch.randn(16, 16, 32)
    outs = []
    for layer in layers:
        compiled = torch.compile(layer.mlp, backend="prunepath", options={
            "tau": 1.0, "calibration": calib, "expert_size": 8})
        with torch.no_grad():
            assert rel_err(compiled(hidden), layer.mlp(hidden)) < 1e-4
            ppcompile.set_tau(compiled, 0.4)
            outs.append(compiled(hidden))
        assert 0 < ppcompile.report(compiled).rows[0]["active_fraction"] < 1
    states = REGISTRY.states_of(list(model.parameters()))
    assert len(states) == 2 and states[0] is not states[1]
    assert not torch.equal(states[0].router_w, states[1].router_w)


@pytest.mark.parametrize("distill_epochs", [0, 1])
def test_non_finite_calibration_tokens_are_left_out_with_a_warning(distill_epochs, capsys):
    # one NaN token (an overflow in a float16 model) made the ridge fit, the k-means and the
    # distillation NaN: a router of NaNs keeps no expert at any tau < 1
    mlp = tiny_model("llama").model.layers[0].mlp
    calib = torch.randn(16, 16, 32)
    calib[3, 5] = float("nan")
    compiled = torch.compile(mlp, backend="prunepath", options={
        "tau": 0.7, "calibration": calib, "expert_size": 8, "distill_epochs": distill_epochs})
    hidden = torch.randn(2, 16, 32)
    with pytest.warns(UserWarning, match=r"1 of \d+ sampled calibration tokens .* non-finite"):
        with torch.no_grad():
            out = compiled(hidden)
    (state,) = REGISTRY.states_of(list(mlp.parameters()))
    assert state.router_w.isfinite().all() and state.router_b.isfinite().all()
    assert 0.3 < ppcompile.report(compiled).active_fraction < 1 and out.isfinite().all()
    if distill_epochs:
        assert "1 batches with non-finite outputs skipped" in capsys.readouterr().err


def test_calibration_with_no_finite_token_is_refused_by_name():
    mlp = tiny_model("llama").model.layers[0].mlp
    compiled = torch.compile(mlp, backend="prunepath", options={
        "calibration": torch.full((4, 16, 32), float("inf")), "expert_size": 8})
    with pytest.raises(Exception, match="option 'calibration': every sampled token"):
        compiled(torch.randn(2, 16, 32))


def test_a_planned_model_cast_to_another_dtype_carries_its_plan_along():
    """.to(dtype) (or .cuda()) keeps the parameter objects, so the plan is found at the next
    compile; its router and per-call tensors follow the weights."""
    model = tiny_model("llama")
    compiled = compile_model(model, tau=0.6)
    run(compiled)
    model.double()
    sparse = run(compiled)
    assert sparse.dtype == torch.float64
    states = REGISTRY.states_of(list(model.parameters()))
    assert all(s.router_w.dtype == torch.float64 for s in states)
    assert 0 < ppcompile.report(compiled).active_fraction < 1
    ppcompile.set_tau(compiled, 1.0)
    assert rel_err(run(compiled), run(model)) < 1e-6  # (Llama normalizes in float32)


def test_save_plan_refuses_ffns_planned_with_different_options(tmp_path):
    model = tiny_model("llama")
    hidden, calib = torch.randn(2, 16, 32), torch.randn(16, 16, 32)
    for layer, size in zip(model.model.layers, (8, 16)):
        torch._dynamo.reset()
        compiled = torch.compile(layer.mlp, backend="prunepath", options={
            "tau": 0.5, "calibration": calib, "expert_size": size, "distill_epochs": 0})
        with torch.no_grad():
            compiled(hidden)
    with pytest.raises(ValueError, match="planned with different options.*'expert_size': 16"):
        ppcompile.save_plan(model, tmp_path / "plan.safetensors")


def test_graph_reused_for_another_layer_uses_that_layers_weights():
    """With the same options dict, dynamo serves layer 1 from the graph compiled for layer 0;
    layer 1 must still compute with its own weights and get its own plan."""
    model = tiny_model("llama")
    options = {"tau": 1.0, "calibration": torch.randn(8, 16, 32), "expert_size": 8}
    mlps = [torch.compile(layer.mlp, backend="prunepath", options=options) for layer in model.model.layers]
    hidden = torch.randn(1, 16, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for compiled, layer in zip(mlps, model.model.layers):
            assert rel_err(compiled(hidden), layer.mlp(hidden)) < 1e-4
    assert len(REGISTRY.states_of(list(model.parameters()))) == 2
    # the graph alternates between the layers' weights: replacing one layer's is still caught
    mlp0 = model.model.layers[0].mlp
    with torch.no_grad():
        mlp0.down_proj.weight.copy_(torch.randn_like(mlp0.down_proj.weight))
        mlps[1](hidden)
        with pytest.raises(RuntimeError, match="replaced in place"):
            mlps[0](hidden)


def test_a_graph_forgets_the_weights_of_a_freed_model(monkeypatch):
    """The compiled graph finds an FFN's plan by its weights' ids, which Python gives to new
    objects once the weights are freed: the entry goes with them, so a later model whose weights
    land at those ids is planned, not run with the freed model's routers."""
    import gc
    graphs = []
    init = ppcompile.backend.SparseGraph.__init__
    monkeypatch.setattr(ppcompile.backend.SparseGraph, "__init__",
                        lambda self, *a: (graphs.append(self), init(self, *a))[1])
    options = {"tau": 0.6, "calibration": torch.randn(8, 16, 32), "expert_size": 8,
               "distill_epochs": 0}
    run = torch.compile(lambda mlp, x: mlp(x), backend="prunepath", options=options)
    hidden = torch.randn(1, 16, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in (0, 1):
            mlp = tiny_model("llama", seed=seed).model.layers[0].mlp
            run(mlp, hidden)
            (graph,) = graphs
            assert len(graph._seen) == 1
            del mlp
            gc.collect()
            assert not graph._seen


def test_model_without_ffn_compiles_dense_with_one_warning():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    compiled = torch.compile(model, backend="prunepath", options={"tau": 0.5})
    x = torch.randn(3, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = compiled(x)
            compiled(torch.randn(5, 8))  # a recompile for a new shape warns no more
    mine = [w for w in caught if "ppcompile" in str(w.message)]
    assert len(mine) == 1 and "no FFN matched" in str(mine[0].message)
    with torch.no_grad():
        assert rel_err(out, model(x)) < 1e-6
    assert ppcompile.report(compiled).rows == []


def test_dense_warning_is_per_model_and_not_for_a_sparse_models_loss_graph():
    def warned(model, *args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                model(*args, **kwargs)
        return [w for w in caught if "no FFN matched" in str(w.message)]

    x = torch.randn(3, 8)
    for model in (torch.nn.Sequential(torch.nn.Linear(8, 8)), torch.nn.Sequential(torch.nn.Linear(8, 4))):
        assert len(warned(torch.compile(model, backend="prunepath"), x)) == 1  # each model warns
    lm = compile_model(tiny_model("gpt2"), tau=0.6)
    assert warned(lm, IDS, labels=IDS) == []  # the loss may be a graph of its own, FFN-free

def test_missing_calibration_warns_and_uses_first_inputs():
    model = tiny_model("gpt2")
    compiled = torch.compile(model, backend="prunepath", options={"expert_size": 8})
    with pytest.warns(UserWarning, match="no calibration data.*'calibration'"):
        run(compiled)
    assert len(ppcompile.report(compiled).rows) == 2


def test_same_seed_same_plan():
    plans = []
    for _ in range(2):
        torch._dynamo.reset()
        model = tiny_model("mistral", seed=3)
        compiled = compile_model(model, tau=0.5, seed=7)
        out = run(compiled)
        states = REGISTRY.states_of(list(model.parameters()))
        plans.append((out, [s.perm for s in states], [s.router_w for s in states]))
    assert torch.equal(plans[0][0], plans[1][0])
    assert all(torch.equal(a, b) for a, b in zip(plans[0][1], plans[1][1]))
    assert all(torch.equal(a, b) for a, b in zip(plans[0][2], plans[1][2]))


def test_a_model_in_train_mode_is_planned_without_dropout_and_runs_with_it():
    """Planning runs the model as in eval(): the plan of a model compiled in train() mode is the
    eval-mode plan, whatever the global RNG; the compiled model itself keeps its dropout."""
    def plan(train, rng):
        torch._dynamo.reset()
        model = tiny_model("gpt2", resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3).train(train)
        torch.manual_seed(rng)
        compiled = compile_model(model, tau=0.6, cache=False, distill_epochs=1)
        with torch.no_grad():
            outs = [logits_of(compiled(IDS)) for _ in range(2)]
        states = REGISTRY.states_of(list(model.parameters()))
        return [s.router_w for s in states], [s.perm for s in states], outs

    routers, perms, outs = plan(False, 0)
    assert torch.equal(*outs)
    train_routers, train_perms, train_outs = plan(True, 123)
    assert all(map(torch.equal, routers, train_routers))
    assert all(map(torch.equal, perms, train_perms))
    assert not torch.equal(*train_outs)  # dropout still runs in the compiled graph


def test_gradients_flow_through_the_sparse_ffn(monkeypatch):
    model = tiny_model("llama")
    compiled = compile_model(model)
    run(compiled)  # calibrate under no_grad first, as users do
    sparse_graph_only(monkeypatch)
    ppcompile.set_tau(compiled, 1.0)
    out = logits_of(compiled(IDS)).square().mean()
    out.backward()
    grad = model.model.layers[0].mlp.up_proj.weight.grad
    model.zero_grad()
    logits_of(model(IDS)).square().mean().backward()
    want = model.model.layers[0].mlp.up_proj.weight.grad
    assert grad is not None and rel_err(grad, want) < 1e-4


def test_an_earlier_graph_runs_the_plan_a_later_compile_gave_its_weights(tmp_path):
    """A compile that gives the same weights a new plan (here from a file, without a dynamo
    reset) and a cast to another dtype and back (new router tensors) both reach the graphs
    compiled before: they run the routers and tau the registry holds now, and their calls are
    counted."""
    model = tiny_model("llama")
    dense = run(model)
    first = compile_model(model, tau=0.5, distill_epochs=0)
    run(first)
    path = tmp_path / "plan.safetensors"
    ppcompile.save_plan(first, path)
    second = torch.compile(model, backend="prunepath", options={"tau": 0.5, "plan": str(path)})
    run(second)
    ppcompile.set_tau(first, 1.0)
    assert rel_err(run(first), dense) < 1e-5  # was sparse: the old states' tau stayed 0.5
    ppcompile.set_tau(first, 0.5)
    sparse = run(first)
    assert all(r["active_fraction"] is not None for r in ppcompile.report(first).rows)
    model.double()
    run(first)  # a float64 graph; the routers move to float64
    model.float()
    assert rel_err(run(first), sparse) < 1e-6
    assert all(r["active_fraction"] is not None for r in ppcompile.report(first).rows)


def test_a_plan_of_ffns_that_share_a_name_loads_by_their_weights(tmp_path):
    """A graph break before a decoder layer names the FFNs of the graphs after it relative to
    their own frames ('mlp' for all three here): the plan file holds three entries of one name,
    and loading it gives each FFN the entry its weights match."""
    def model():
        m = tiny_model("llama", num_hidden_layers=3)
        m.model.layers[1].register_forward_pre_hook(lambda *a: torch._dynamo.graph_break())
        return m

    first = compile_model(model(), tau=0.5, distill_epochs=0)
    want = run(first)
    assert len({r["name"] for r in ppcompile.report(first).rows}) < 3
    path = tmp_path / "plan.safetensors"
    ppcompile.save_plan(first, path)
    torch._dynamo.reset()
    again = torch.compile(model(), backend="prunepath", options={"tau": 0.5, "plan": str(path)})
    assert rel_err(run(again), want) < 1e-6


def test_new_calibration_data_plans_the_same_model_anew(capsys):
    """Compiled again with other calibration data, a model is planned on that data (it kept the
    first plan, silently); compiled again with the same data or with none, it keeps its plan."""
    model = tiny_model("llama")
    run(compile_model(model, tau=0.5, cache=False, distill_epochs=0))
    first = [s.router_w.clone() for s in REGISTRY.states_of(list(model.parameters()))]
    other = CALIB.flip(0) // 2
    for calibration, replanned in ((other, True), (other, False), (None, False)):
        torch._dynamo.reset()
        capsys.readouterr()
        run(compile_model(model, tau=0.5, cache=False, distill_epochs=0, calibration=calibration))
        assert ("calibrated" in capsys.readouterr().err) == replanned
    now = REGISTRY.states_of(list(model.parameters()))
    assert all(s.calibration is not None for s in now)
    assert not any(torch.equal(a, s.router_w) for a, s in zip(first, now))


def test_training_through_the_model_keeps_its_plan_across_recompiles():
    """Weights trained in place (the optimizer made after the first call, as the README says)
    keep their plan and neuron order when a new input length recompiles: re-planning them would
    permute them under the optimizer (they had moved past the plan's 5% match)."""
    model = tiny_model("llama")
    compiled = compile_model(model, tau=0.7, distill_epochs=0)
    run(compiled)
    states = REGISTRY.states_of(list(model.parameters()))
    perms = [s.perm.clone() for s in states]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        out = logits_of(compiled(IDS))
        loss = torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "planning it again"
        warnings.filterwarnings("ignore", message=".*(reference op|calibrat).*")
        run(compiled, IDS[:, :9])
    now = REGISTRY.states_of(list(model.parameters()))
    assert all(a is b for a, b in zip(states, now))
    assert all(torch.equal(p, s.perm) for p, s in zip(perms, now))
    run(compiled)  # the first length's graph still runs (no "replaced in place")


def test_a_graph_compiled_for_gradients_keeps_the_reference_op(monkeypatch):
    """On the GPU the sparse FFNs of a graph that AOT autograd differentiates stay on the torch
    reference op (the triton_op has no backward): here the weights are on the CPU and the
    lowering is told they are on a GPU. Grad mode warns, naming the way to the kernels, and the
    gradients flow."""
    lowering = importlib.import_module("ppcompile.passes.lower_to_triton")
    monkeypatch.setattr(lowering, "on_gpu", lambda t: True)
    model = tiny_model("llama")
    compiled = compile_model(model, tau=0.5)
    with pytest.warns(UserWarning, match=r"reference op.*torch\.no_grad\(\)"):
        out = logits_of(compiled(IDS))
    out.square().mean().backward()
    grad = model.model.layers[0].mlp.up_proj.weight.grad
    assert grad is not None and bool(grad.isfinite().all()) and grad.abs().sum() > 0


@pytest.mark.parametrize("kept", [True, False])
def test_plan_file_carries_layer_budgets(tmp_path, monkeypatch, kept):
    module = importlib.import_module("ppcompile.passes.train_routers")
    real = module.check_budget
    monkeypatch.setattr(module, "check_budget", lambda *a: {**real(*a), "kept": kept})
    model = tiny_model("llama")
    compiled = compile_model(model, tau=0.6)
    out = run(compiled)
    path = tmp_path / "plan.safetensors"
    ppcompile.save_plan(compiled, path)
    states = REGISTRY.states_of(list(model.parameters()))
    torch._dynamo.reset()
    again = tiny_model("llama")  # same weights, another object: planned from the file only
    loaded = torch.compile(again, backend="prunepath", options={"tau": 0.6, "plan": str(path)})
    assert rel_err(run(loaded), out) < 1e-5
    for a, b in zip(states, REGISTRY.states_of(list(again.parameters()))):
        assert (a.tau_table is None) == (b.tau_table is None) == (not kept)
        assert not kept or torch.equal(a.tau_table, b.tau_table)
        assert float(a.tau) == float(b.tau)


def test_plan_file_carries_temperature_tables(tmp_path, monkeypatch):
    """A plan with router temperatures per tau: the file stores the routers at temperature 1 and
    the tables; the loaded model follows set_tau exactly as the one that made the plan."""
    ct = importlib.import_module("ppcompile.passes.choose_temperature")
    designed = iter([3.0, 1.0, 2.0, 2.0, 1.0, 3.0, 4.0, 4.0])  # T = 0.75, 1, 1.5, 2 x (lo, hi)
    monkeypatch.setattr(ct, "TEMPERATURES", (0.75, 1.0, 1.5, 2.0))
    monkeypatch.setattr(ct, "sparse_loss", lambda *a: next(designed))
    monkeypatch.setattr(ct, "_fraction_grows", lambda *a: True)
    tr = importlib.import_module("ppcompile.passes.train_routers")
    real = tr.check_budget
    monkeypatch.setattr(tr, "check_budget", lambda *a: {**real(*a), "kept": False})
    model = tiny_model("llama")
    compiled = compile_model(model, tau=0.6, distill_epochs=0)
    out = run(compiled)
    path = tmp_path / "plan.safetensors"
    ppcompile.save_plan(compiled, path)
    states = REGISTRY.states_of(list(model.parameters()))
    assert all(s.temperature_table is not None for s in states)
    torch._dynamo.reset()
    again = tiny_model("llama")
    loaded = torch.compile(again, backend="prunepath", options={"tau": 0.6, "plan": str(path)})
    assert rel_err(run(loaded), out) < 1e-5
    for tau in (0.95, 0.3):
        ppcompile.set_tau(compiled, tau)
        ppcompile.set_tau(loaded, tau)
        assert rel_err(run(loaded), run(compiled)) < 1e-5
        for a, b in zip(states, REGISTRY.states_of(list(again.parameters()))):
            assert torch.equal(a.temperature_table, b.temperature_table)
            assert torch.allclose(a.router_w, b.router_w) and a.temperature(tau) != 1.0


def test_inductor_cache_key_holds_the_kernel_sources(tmp_path, monkeypatch):
    """Inductor traces the GPU op's launcher (its launch table) only while lowering, after its
    FX-graph cache key is made: the backend adds our kernel files' hash to that key, so a changed
    launcher compiles anew instead of being served the code of the previous one (GPU_RUNS.md,
    run 97), while an unchanged one still hits the cache."""
    from torch._dynamo.utils import counters
    from torch._inductor import config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(config, "fx_graph_cache", True)
    monkeypatch.setattr(config, "force_disable_caches", False)
    source = tmp_path / "triton_ffn.py"
    monkeypatch.setattr(ppcompile.backend.KernelsInCacheKey, "FILES", (str(source),))

    def compile_once(version: str):
        source.write_text(version)
        ppcompile.backend.get_hash_for_files.cache_clear()
        torch._dynamo.reset()
        before = dict(counters["inductor"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no FFN: compiled dense, with a warning
            torch.compile(lambda x: torch.relu(x) * 2 + 1, backend="prunepath")(torch.randn(4, 8))
        return {k: counters["inductor"][k] - before.get(k, 0)
                for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}

    assert compile_once("a")["fxgraph_cache_miss"] == 1
    assert compile_once("a")["fxgraph_cache_hit"] == 1
    assert compile_once("b")["fxgraph_cache_miss"] == 1
    # a post-grad pass of the user's own is left alone (its uuid decides the key)
    monkeypatch.setattr(config, "post_grad_custom_post_pass", lambda graph: None)
    assert compile_once("c")["fxgraph_cache_hit"] == 0


def test_a_graph_that_returns_its_loss_plans_and_runs(capsys):
    """model(ids, labels=ids) returns the loss (0-d) beside the logits: the plan passes'
    distillation and checks read the logits, and the loss follows the sparse model."""
    model = tiny_model("llama")
    with torch.no_grad():
        eager = model(IDS, labels=IDS)
    compiled = compile_model(model, tau=0.5)
    with torch.no_grad():
        sparse = compiled(IDS, labels=IDS)
    err = capsys.readouterr().err  # the distillation ran (kept or not), on the logits
    assert re.search(r"router distillation (kept|dropped): \d+ updates", err)
    assert sparse.loss.dim() == 0 and abs(sparse.loss.item() - eager.loss.item()) > 1e-4
    ppcompile.set_tau(compiled, 1.0)
    with torch.no_grad():
        dense = compiled(IDS, labels=IDS)
    assert abs(dense.loss.item() - eager.loss.item()) < 1e-5
    assert rel_err(dense.logits, eager.logits) < 1e-4


@pytest.mark.parametrize("tied", ["gate_proj", "down_proj"])
def test_ffns_sharing_some_weights_stay_dense(tied):
    """Two FFNs that share one projection (not the whole FFN) cannot both reorder its neurons:
    they stay dense, with a warning, and the model (eager too) is unchanged."""
    model = tiny_model("llama")
    mlps = [layer.mlp for layer in model.model.layers]
    setattr(mlps[1], tied, getattr(mlps[0], tied))
    eager = run(model)
    with pytest.warns(UserWarning, match="share some of their weights"):
        compiled = compile_model(model, tau=0.5)
        out = run(compiled)
    assert ppcompile.report(compiled).rows == []
    assert rel_err(out, eager) < 1e-5 and rel_err(run(model), eager) < 1e-6


def test_graph_break_before_the_first_ffn(monkeypatch):
    """The graph that the token ids feed (embeddings) holds no FFN when a graph break follows it:
    the graphs after the break take hidden states and calibrate on their call's inputs, with a
    warning (the calibration option is not refused as fitting no input)."""
    import transformers.models.llama.modeling_llama as llama
    attention = llama.LlamaAttention.forward

    def broken(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return attention(self, *args, **kwargs)

    monkeypatch.setattr(llama.LlamaAttention, "forward", broken)
    model = tiny_model("llama")
    eager = run(model)
    with pytest.warns(UserWarning, match="fits none of this graph's inputs"):
        compiled = compile_model(model, tau=0.5)
        sparse = run(compiled)
    rows = ppcompile.report(compiled).rows
    assert len(rows) == 2 and all(0 < r["active_fraction"] < 1 for r in rows)
    assert rel_err(sparse, eager) > 1e-3
    ppcompile.set_tau(compiled, 1.0)
    assert rel_err(run(compiled), eager) < 1e-4


def test_a_recompile_of_an_earlier_handle_keeps_set_tau():
    """Two torch.compile calls on one model share its FFNs' tau: each sets it at its first
    compile; a later recompile of the first handle (a new length) keeps what set_tau chose."""
    model = tiny_model("llama")
    first = compile_model(model, tau=0.5)
    run(first)
    second = compile_model(model, tau=0.9)
    run(second)
    assert {r["tau"] for r in ppcompile.report(model).rows} == {0.9}
    ppcompile.set_tau(model, 0.3)
    run(first, IDS[:, :9])  # a new length: dynamo recompiles the first handle's frame
    assert {r["tau"] for r in ppcompile.report(model).rows} == {0.3}


def test_a_graph_traced_on_zero_tokens_compiles_and_the_next_length_goes_sparse():
    ffn = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    compiled = torch.compile(ffn.eval(), backend="prunepath", options=dict(
        tau=0.5, calibration=torch.randn(16, 4, 32), distill_epochs=0, calibration_tokens=64))
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for shape in [(2, 0, 32), (0, 4, 32)]:
            assert compiled(torch.randn(shape)).shape == shape
    assert not [w for w in seen if "no FFN matched" in str(w.message)]  # it has FFNs
    with torch.no_grad():
        x = torch.randn(2, 4, 32)
        y = compiled(x)
    assert y.shape == x.shape and rel_err(y, ffn(x)) > 1e-3  # sparse at tau 0.5
    assert 0 < ppcompile.report(compiled).active_fraction < 1


def test_a_compile_that_fails_while_planning_leaves_no_half_made_plan(monkeypatch):
    """choose_temperature rewrites routers and thresholds in place while it tries temperatures;
    an error or Ctrl-C there must not leave those states for the next call to adopt."""
    import ppcompile.passes as passes
    model = tiny_model("llama")
    eager = run(model)
    real = list(passes.PASSES)

    def interrupted(gm, ctx):
        for ffn in gm.meta["ppcompile_ffns"]:  # as if stopped while trying a temperature
            ffn.state.tau.fill_(0.83)
            ffn.state.router_w.mul_(4.0 / 3.0)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(passes, "PASSES", [interrupted if p is passes.choose_temperature else p
                                           for p in real])
    compiled = compile_model(model, tau=0.6, distill_epochs=0)
    with pytest.raises(Exception, match="interrupted"):
        run(compiled)
    assert REGISTRY.states_of(list(model.parameters())) == []
    assert rel_err(run(model), eager) < 1e-5  # permuted weights: the same dense function
    monkeypatch.setattr(passes, "PASSES", real)
    run(compiled)  # plans again
    states = REGISTRY.states_of(list(model.parameters()))
    assert len(states) == 2 and all(float(s.model_tau) == pytest.approx(0.6) for s in states)
    assert all(float(s.tau) != pytest.approx(0.83) for s in states)
