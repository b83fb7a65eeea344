"""Each pass on its own: what the graph holds before and after (op counts), and what it
guarantees."""
import importlib
import math
import operator
from collections import Counter

import pytest
import torch

from conftest import capture, logits_of, rel_err
from ppcompile.ffn import REGISTRY
from ppcompile.graph import graph_tensors
from ppcompile.kernels.reference import ffn_hidden, sparse_ffn_reference
from ppcompile.options import Options
from ppcompile.passes import (Context, attach_plans, build_experts, calibrate,
                              choose_temperature, distill_routers, find_ffns, rewrite,
                              train_routers)
from ppcompile.passes.build_experts import balanced_assign, balanced_kmeans
from ppcompile.passes.calibrate import residual_add
from ppcompile.passes.train_routers import TAU_GRID, layer_budgets
from tiny_models import FAMILIES, tiny_model

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(1))
LINEAR_LIKE = {"linear", "addmm", "matmul"}


def op_counts(gm):
    counts = Counter()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(
                node.target, "__name__", str(node.target))
            counts[str(name).split(".")[0]] += 1
        else:
            counts[node.op] += 1
    return counts


def setup(family, **options):
    model = tiny_model(family)
    gm, example = capture(model, IDS)
    opts = Options.from_dict({"calibration": CALIB, "expert_size": 8, **options})
    return model, gm, Context(example, graph_tensors(gm, example), opts, options)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_find_ffns_matches_each_layer_and_leaves_graph_alone(family):
    _, gm, ctx = setup(family)
    before = op_counts(gm)
    gm = find_ffns(gm, ctx)
    assert op_counts(gm) == before
    ffns = gm.meta["ppcompile_ffns"]
    assert len(ffns) == 2  # two layers, and no attention or head projection matched
    assert {f.kind for f in ffns} == {FAMILIES[family][3]}
    for f in ffns:
        # the FFN's own values are used by nothing outside it
        inside = {*f.region, *f.down.nodes}
        for node in f.region:
            assert set(node.users) <= inside


@pytest.mark.parametrize("activation, kind", [
    ("gelu_new", "gelu_tanh"), ("gelu_fast", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"),
    ("quick_gelu", "quick_gelu"), ("relu", "relu"), ("gelu", "gelu"), ("silu", "silu")])
def test_activation_spelled_any_way_is_identified(activation, kind):
    model = tiny_model("gpt2", activation_function=activation)
    gm, example = capture(model, IDS)
    gm = find_ffns(gm, Context(example, graph_tensors(gm, example), Options()))
    assert [f.kind for f in gm.meta["ppcompile_ffns"]] == [kind, kind]


def test_unknown_activation_is_not_matched():
    class Odd(torch.nn.Module):  # linear -> sin -> linear: not an FFN form we know
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.b(torch.sin(self.a(x)))

    gm, example = capture(Odd(), torch.randn(2, 8))
    gm = find_ffns(gm, Context(example, graph_tensors(gm, example), Options()))
    assert gm.meta["ppcompile_ffns"] == []


@pytest.mark.parametrize("activation", ["relu6", "gelu_10"])
def test_clipped_activation_is_not_taken_for_the_unclipped_one(activation):
    # relu6 equals relu, and a GELU clipped at 10 equals GELU, on moderate values: matched as
    # those, the rewrite would drop the clip and compute another function
    model = tiny_model("gpt2", activation_function=activation)
    gm, example = capture(model, IDS)
    gm = find_ffns(gm, Context(example, graph_tensors(gm, example), Options()))
    assert gm.meta["ppcompile_ffns"] == []


@pytest.mark.parametrize("limit", [None, 7.0])
def test_swiglu_with_clamped_gate_and_up_is_not_matched(limit):
    class Clamped(torch.nn.Module):  # gpt-oss clamps its SwiGLU's gate and up at 7
        def __init__(self):
            super().__init__()
            self.gate, self.up = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)
            self.down = torch.nn.Linear(16, 8)

        def forward(self, x):
            g, u = self.gate(x), self.up(x)
            if limit is not None:
                g, u = g.clamp(max=limit), u.clamp(-limit, limit)
            return self.down(torch.nn.functional.silu(g) * u)

    gm, example = capture(Clamped(), torch.randn(2, 8))
    gm = find_ffns(gm, Context(example, graph_tensors(gm, example), Options()))
    assert [f.kind for f in gm.meta["ppcompile_ffns"]] == ([] if limit else ["swiglu"])


def test_ffn_whose_hidden_value_escapes_is_not_matched():
    class Leaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h), h.sum()

    gm, example = capture(Leaky(), torch.randn(2, 8))
    gm = find_ffns(gm, Context(example, graph_tensors(gm, example), Options()))
    assert gm.meta["ppcompile_ffns"] == []


def test_calibrate_samples_bounded_tokens_without_changing_graph():
    _, gm, ctx = setup("llama", calibration_tokens=100)
    gm = attach_plans(find_ffns(gm, ctx), ctx)
    before = op_counts(gm)
    gm = calibrate(gm, ctx)
    assert op_counts(gm) == before
    for f in gm.meta["ppcompile_ffns"]:
        assert f.sample["x"].shape == (100, 32) and f.sample["h"].shape == (100, 64)
        assert f.sample["weight"].shape == (100,)
        assert torch.isfinite(f.sample["h"]).all()


def test_build_experts_permutes_weights_but_not_the_function():
    model, gm, ctx = setup("llama")
    with torch.no_grad():
        before = logits_of(model(IDS))
    gm = calibrate(attach_plans(find_ffns(gm, ctx), ctx), ctx)
    up = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    counts = op_counts(gm)
    gm = build_experts(gm, ctx)
    assert op_counts(gm) == counts
    perm = gm.meta["ppcompile_ffns"][0].perm
    assert sorted(perm.tolist()) == list(range(64)) and perm.tolist() != list(range(64))
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, up[perm])
    with torch.no_grad():
        assert rel_err(logits_of(model(IDS)), before) < 1e-6


def test_train_routers_registers_one_state_per_ffn():
    model, gm, ctx = setup("gpt2")
    for p in (find_ffns, attach_plans, calibrate, build_experts):
        gm = p(gm, ctx)
    gm = train_routers(gm, ctx)
    states = REGISTRY.states_of(list(model.parameters()))
    assert len(states) == 2 and states[0] is not states[1]
    assert states[0].router_w.shape == (128 // 8, 32)
    # the samples stay for distill_routers and choose_temperature, which releases them
    assert all(f.state is not None and f.sample is not None for f in gm.meta["ppcompile_ffns"])


def planned_graph(**options):
    model, gm, ctx = setup("llama", tau=0.5, **options)
    for p in (find_ffns, attach_plans, calibrate, build_experts, train_routers):
        gm = p(gm, ctx)
    return model, gm, ctx


def test_sparse_copy_computes_only_the_kept_neurons_down_projection():
    """The plan passes' sparse runs replace each planned FFN's down projection by the product of
    the kept neurons only (no dense product to subtract from); at tau = 1 that is the dense
    model, below it the sparse-FFN reference."""
    tr = importlib.import_module("ppcompile.passes.train_routers")
    _, gm, ctx = planned_graph()
    planned = [(f, f.weights(ctx.values)) for f in gm.meta["ppcompile_ffns"]]
    # an in-place write whose result nobody reads (a KV cache's index_copy_) must survive
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(first):
        gm.graph.call_method("mul_", (first, 1))
    gm.recompile()
    sparse = tr.sparse_copy(gm, planned)
    before, after = op_counts(gm), op_counts(sparse)
    assert after["linear"] == before["linear"] - len(planned)
    assert after["mul_"] == before["mul_"] == 1
    assert sum(n for name, n in after.items() if name.startswith("sparse_")) == len(planned)
    batch = tr.fresh_inputs(tr.calibration_batches(gm, ctx)[0])
    with torch.no_grad():
        dense = gm(*batch)
        for ffn, _ in planned:
            ffn.state.tau.fill_(1.0)
        outputs = tr.floating_outputs
        assert all(torch.allclose(a, b, atol=1e-5)
                   for a, b in zip(outputs(sparse(*batch)), outputs(dense), strict=True))
        ffn, w = planned[0]  # one FFN below tau = 1: its output is the reference op's
        ffn.state.tau.fill_(0.5)
        x = ffn.sample["x"][:64].float()
        h = ffn_hidden(x, w["w_up"], w["b_up"], w["w_gate"], w["b_gate"], ffn.state.activation)
        y = tr._sparsifier(ffn.state, w)(x, h)
        want, counts = sparse_ffn_reference(
            x, w["w_up"], w["b_up"], w["w_gate"], w["b_gate"], w["w_down"], w["b_down"],
            ffn.state.router_w, ffn.state.router_b, ffn.state.tau, ffn.state.activation,
            ffn.state.expert_size, "prunepath")
        assert 0 < counts[0] < x.shape[0] * ffn.d_ff  # some experts dropped, not all
        assert torch.allclose(y, want, atol=1e-5)


def test_distill_routers_trains_only_routers_and_keeps_them_only_if_they_help():
    model, gm, ctx = planned_graph(distill_epochs=3)
    states = [f.state for f in gm.meta["ppcompile_ffns"]]
    fitted = [(s.router_w.clone(), s.router_b.clone()) for s in states]
    tensors = [s.router_w for s in states]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    counts = op_counts(gm)
    gm = distill_routers(gm, ctx)
    assert op_counts(gm) == counts
    # choose_temperature reads them next
    assert all(f.sample is not None for f in gm.meta["ppcompile_ffns"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    # no gradient reached the model's own weights (none computed, none left behind)
    assert all(p.grad is None for p in model.parameters())
    assert [s.router_w for s in states] == tensors  # updated in place
    report = gm.meta["ppcompile_distill"]
    assert len(report["losses"]) == 3  # 384 tokens per epoch: one update each
    changed = [not torch.equal(s.router_w, w) for s, (w, _) in zip(states, fitted)]
    if report["kept"]:
        assert all(changed) and report["loss_distilled"] < report["loss_fitted"]
    else:
        assert not any(changed) and report["loss_distilled"] >= report["loss_fitted"]
    for s in states:
        s.set_tau(1.0)
    assert all(float(s.tau) == 1.0 for s in states)


@pytest.mark.parametrize("stream", [False, True])
def test_distill_updates_count_the_calibration_tokens_of_a_stream_too(stream):
    """~2048 tokens per update whether the calibration data is [N, T] rows or one 1-D token
    stream (which had been counted as a single token: one update per epoch)."""
    data = torch.randint(0, 128, (128, 32), generator=torch.Generator().manual_seed(2))
    _, gm, ctx = planned_graph(distill_epochs=1, calibration=data.flatten() if stream else data)
    gm = distill_routers(gm, ctx)
    # 4096 tokens in windows of 12 (IDS), 2 per batch: one batch checks, the rest make 2 updates
    assert len(gm.meta["ppcompile_distill"]["losses"]) == 2


def test_distill_routers_repairs_damaged_routers():
    """Routers scrambled after the per-layer fit (each expert gets another's router row):
    distillation must lower the loss and the check batch's output error, and be kept."""
    _, gm, ctx = planned_graph(distill_epochs=40)
    gen = torch.Generator().manual_seed(5)
    for f in gm.meta["ppcompile_ffns"]:
        perm = torch.randperm(f.state.router_w.shape[0], generator=gen)
        f.state.router_w.copy_(f.state.router_w[perm])
        f.state.router_b.copy_(f.state.router_b[perm])
    gm = train_routers_budget_again(gm, ctx)
    gm = distill_routers(gm, ctx)
    report = gm.meta["ppcompile_distill"]
    assert report["losses"][-1] < 0.7 * report["losses"][0]
    assert report["kept"] and report["loss_distilled"] < report["loss_fitted"]


@pytest.mark.parametrize("budget", [True, False])
def test_distill_routers_leaves_the_first_ffns_routers_as_fitted_under_a_budget(budget,
                                                                              monkeypatch):
    """Where the layer budget is kept, the routers of the first FIXED_SHARE of the FFNs keep
    train_routers' fit (the backward stops at the lowest trained router) and the others train;
    without it every router trains. Routers damaged first: the distillation must repair them,
    and be kept."""
    module = importlib.import_module("ppcompile.passes.distill_routers")
    monkeypatch.setattr(module, "FIXED_SHARE", 0.5)  # of the tiny model's two FFNs: the first
    _, gm, ctx = planned_graph(distill_epochs=40)
    states = [f.state for f in gm.meta["ppcompile_ffns"]]
    gen = torch.Generator().manual_seed(5)
    for s in states:
        perm = torch.randperm(s.router_w.shape[0], generator=gen)
        s.router_w.copy_(s.router_w[perm])
        s.router_b.copy_(s.router_b[perm])
    tr = importlib.import_module("ppcompile.passes.train_routers")
    check = tr.check_budget  # the budget's verdict, forced
    monkeypatch.setattr(tr, "check_budget", lambda *args: {**check(*args), "kept": budget})
    gm = train_routers_budget_again(gm, ctx)
    fitted = [(s.router_w.clone(), s.router_b.clone()) for s in states]
    gm = distill_routers(gm, ctx)
    report = gm.meta["ppcompile_distill"]
    assert report["kept"] and report["losses"][-1] < report["losses"][0]
    first_fixed = torch.equal(states[0].router_w, fitted[0][0])
    assert first_fixed == torch.equal(states[0].router_b, fitted[0][1]) == budget
    assert not torch.equal(states[1].router_w, fitted[1][0])


def test_budget_check_gives_distillation_its_baseline():
    """distill_routers starts from the dense outputs calibrate kept and the budget check's loss
    instead of running them again: they must be what the dense graph (at the passes' precision)
    and its own check compute on the fitted routers; it releases the kept outputs."""
    module = importlib.import_module("ppcompile.passes.distill_routers")
    _, gm, ctx = planned_graph(distill_epochs=1)
    planned = [(f, f.weights(ctx.values)) for f in gm.meta["ppcompile_ffns"]]
    verdict = gm.meta["ppcompile_budget"]
    batches = module.calibration_batches(gm, ctx)
    kept = gm.meta["ppcompile_dense"]
    assert sorted(kept) == list(range(len(batches)))  # a tiny model's outputs all fit
    for index, batch in enumerate(batches):
        with torch.no_grad(), module.plan_precision(gm, planned):  # as calibrate ran it
            dense = module.floating_outputs(gm(*module.fresh_inputs(batch)))
        assert len(kept[index]) == len(dense)
        # kept as the run made them where it made 16-bit outputs, else in float16 (kept_outputs)
        assert all(a.dtype in (torch.float16, torch.bfloat16)
                   and torch.allclose(a.float(), b, rtol=1e-3, atol=1e-4)
                   for a, b in zip(kept[index], dense))
    width = module.LOGITS_WIDTH * max(f.d_model for f, _ in planned)
    loss = module.sparse_loss(module.sparse_copy(gm, planned), planned, verdict["taus"][0],
                              batches[0], kept[0], width)
    assert verdict["loss"] == pytest.approx(loss, rel=1e-6)
    gm = choose_temperature(distill_routers(gm, ctx), ctx)
    assert "ppcompile_dense" not in gm.meta


def train_routers_budget_again(gm, ctx):
    """Refit the layer budget and its check on the routers as they are now."""
    from ppcompile.passes.train_routers import fit_budget
    fit_budget(gm, ctx, [(f, f.weights(ctx.values)) for f in gm.meta["ppcompile_ffns"]])
    return gm


def test_dense_outputs_past_the_memory_budget_are_recomputed(monkeypatch):
    """calibrate keeps no dense output that does not fit DENSE_KEEP_BYTES; the budget check keeps
    batch 0's, and the distillation runs the dense graph for the others."""
    monkeypatch.setattr(importlib.import_module("ppcompile.passes.calibrate"),
                        "DENSE_KEEP_BYTES", 0)
    _, gm, ctx = planned_graph(distill_epochs=1)
    assert sorted(gm.meta["ppcompile_dense"]) == [0]
    gm = distill_routers(gm, ctx)
    assert sorted(gm.meta["ppcompile_dense"]) == [0] and gm.meta["ppcompile_distill"]["losses"]


@pytest.mark.parametrize("device", ["cpu", pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("vocab", [7, 300])
def test_sliced_distillation_loss_matches_autograd(vocab, device, monkeypatch):
    """The KL loss and its hand-written gradient, a slice of tokens at a time (slices smaller
    than a row too), are the unsliced autograd ones, on the outputs' device; so is the budget
    check's squared error."""
    tr = importlib.import_module("ppcompile.passes.train_routers")
    monkeypatch.setattr(tr, "SLICE_ELEMENTS", 250)
    g = torch.Generator().manual_seed(0)
    got = (torch.randn(3, 5, vocab, generator=g) * 3).to(device).requires_grad_(True)
    want = (torch.randn(3, 5, vocab, generator=g) * 3).to(device)
    logp_want = want.log_softmax(-1)
    ref = (logp_want.exp() * (logp_want - got.log_softmax(-1))).sum(-1).mean()
    (grad_ref,) = torch.autograd.grad(ref, got)
    assert tr.distill_loss([got], [want], 5) == pytest.approx(float(ref), rel=1e-5)
    loss, buffer = tr.distill_backward([got], [want], 5, 0.5)
    assert loss == pytest.approx(float(ref), rel=1e-5)
    assert torch.allclose(got.grad, 0.5 * grad_ref, atol=1e-7)
    assert tr.distill_backward([got], [want], 5, 0.5, buffer)[1] is buffer  # reused
    # a bfloat16 run's logits: read a slice at a time in float32, their gradient in bfloat16
    half = got.detach().bfloat16().requires_grad_(True)
    loss, buffer = tr.distill_backward([half], [want], 5, 0.5)
    (grad_half,) = torch.autograd.grad(
        (logp_want.exp() * (logp_want - half.float().log_softmax(-1))).sum(-1).mean(), half)
    assert loss == pytest.approx(float(ref), rel=1e-2) and buffer.dtype == torch.bfloat16
    assert torch.allclose(half.grad.float(), 0.5 * grad_half.float(), rtol=1e-2, atol=1e-4)
    assert tr._sum_sq(got, want) == pytest.approx(float((got - want).square().sum()), rel=1e-5)
    # narrower than logits: the relative squared error, through autograd
    enc = torch.randn(4, 3, generator=g).to(device).requires_grad_(True)
    target = torch.randn(4, 3, generator=g).to(device)
    expected = float((enc - target).square().sum() / target.square().sum())
    assert tr.distill_backward([enc], [target], 5, 1.0)[0] == pytest.approx(expected, rel=1e-6)
    assert enc.grad is not None


def test_kept_dense_outputs_are_16_bit_only_where_that_holds_them():
    calibrate_module = importlib.import_module("ppcompile.passes.calibrate")
    small, large = torch.randn(3, 4) * 50, torch.randn(3, 4) * 1e5
    kept = calibrate_module.kept_outputs({"a": small, "b": (large, torch.arange(3))})
    assert [t.dtype for t in kept] == [torch.float16, torch.float32]  # integers dropped
    assert torch.allclose(kept[0].float(), small, rtol=1e-3) and torch.equal(kept[1], large)
    assert kept[1].data_ptr() != large.data_ptr()  # copies: the graph may reuse its outputs
    # 16-bit outputs stay as they are; copied only where an input shares their memory (the next
    # run may write into it) or where they are views
    fresh, written = small.bfloat16(), torch.randn(3, 4).half()
    kept = calibrate_module.kept_outputs([fresh, written, fresh[1:]], inputs=[written])
    assert [t.dtype for t in kept] == [torch.bfloat16, torch.float16, torch.bfloat16]
    assert kept[0].data_ptr() == fresh.data_ptr()
    assert kept[1].data_ptr() != written.data_ptr() and torch.equal(kept[1], written)
    assert kept[2].untyped_storage().data_ptr() != fresh.untyped_storage().data_ptr()
    assert torch.equal(kept[2], fresh[1:])
    nan = torch.tensor([1.0, float("nan")])
    assert calibrate_module.kept_outputs([nan])[0].dtype == torch.float32
    tiny = torch.randn(3, 4) * 1e-6  # subnormal in float16: 2-3 significant bits
    assert calibrate_module.kept_outputs([tiny])[0].dtype == torch.float32


def test_plan_runs_autocast_only_float32_weights_on_native_bf16(monkeypatch):
    """The plan passes' runs of the graph use bfloat16 matrix products where the hardware has them
    (CPUs with AMX or AVX512-BF16, CUDA) and the weights are float32; the routers' selection
    stays float32, so the kept experts are those of a float32 run."""
    tr = importlib.import_module("ppcompile.passes.train_routers")
    cal = importlib.import_module("ppcompile.passes.calibrate")
    monkeypatch.setattr(cal, "cpu_multiplies_bf16", lambda: True)
    calibrated_under, add = [], cal._Sampler.add

    def sample(self, ffn, *args):
        calibrated_under.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                                else None)
        return add(self, ffn, *args)
    monkeypatch.setattr(cal._Sampler, "add", sample)
    _, gm, ctx = planned_graph()
    planned = [(f, f.weights(ctx.values)) for f in gm.meta["ppcompile_ffns"]]
    assert calibrated_under and set(calibrated_under) == {torch.bfloat16}  # calibrate's runs too
    assert all(f.sample is None or f.sample["x"].dtype == torch.float32
               for f in gm.meta["ppcompile_ffns"])
    assert cal.plan_precision(gm, planned).fast_dtype == torch.bfloat16
    with cal.plan_precision(gm, planned):
        assert torch.is_autocast_enabled("cpu")
    with cal.plan_precision(tr.sparse_copy(gm, planned), planned):  # the passes' own functions
        assert torch.is_autocast_enabled("cpu")
    half = [(f, dict(w, w_down=w["w_down"].bfloat16())) for f, w in planned]
    with cal.plan_precision(gm, half):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(cal, "cpu_multiplies_bf16", lambda: False)
    with cal.plan_precision(gm, planned):
        assert not torch.is_autocast_enabled("cpu")
    # the selection inside a sparse FFN output under autocast is the float32 one
    ffn, w = planned[0]
    x = ffn.sample["x"][:64]
    seen = []

    def keep_mask(method, x2d, h, w_down, router_w, *rest):
        seen.append((torch.is_autocast_enabled("cpu"), x2d.dtype, router_w.dtype))
        return torch.ones(x2d.shape[0], ffn.d_ff // ffn.state.expert_size, dtype=torch.bool)
    monkeypatch.setattr(tr, "keep_mask", keep_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tr._sparsifier(ffn.state, w)(x.bfloat16(), torch.zeros(64, ffn.d_ff))
    assert seen == [(False, torch.float32, torch.float32)]


def test_graphs_that_write_in_place_plan_in_float32(monkeypatch):
    """A static KV cache is written with index_copy_, which cannot take bfloat16 values into a
    float32 cache: such graphs' plan passes run without autocast, and generate() compiles."""
    from transformers import StaticCache
    cal = importlib.import_module("ppcompile.passes.calibrate")
    monkeypatch.setattr(cal, "cpu_multiplies_bf16", lambda: True)
    graph = torch.fx.Graph()
    cache, x = graph.placeholder("cache"), graph.placeholder("x")
    graph.output(graph.call_method("index_copy_", (cache, 0, graph.placeholder("i"), x)))
    assert cal.writes_in_place(torch.fx.GraphModule(torch.nn.Module(), graph))
    pure = torch.fx.Graph()  # `&` of two masks is operator.and_: not a write
    pure.output(pure.call_function(operator.and_, (pure.placeholder("a"), pure.placeholder("b"))))
    assert not cal.writes_in_place(torch.fx.GraphModule(torch.nn.Module(), pure))
    _, gm, ctx = planned_graph()
    assert not cal.writes_in_place(gm)
    model = tiny_model("llama")
    reference = model.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    model.forward = torch.compile(model.forward, backend="prunepath", options={
        "tau": 1.0, "calibration": CALIB, "expert_size": 8, "distill_epochs": 1})
    with torch.no_grad():
        out = model.generate(IDS[:1], past_key_values=StaticCache(config=model.config,
                                                                   max_cache_len=32),
                             max_new_tokens=4, do_sample=False, disable_compile=True)
    assert torch.equal(out, reference)  # tau = 1: the dense model's tokens


def test_distill_routers_off_changes_nothing():
    _, gm, ctx = planned_graph(distill_epochs=0)
    assert sorted(gm.meta["ppcompile_dense"]) == [0]  # the budget check's batch only
    routers = [f.state.router_w.clone() for f in gm.meta["ppcompile_ffns"]]
    gm = distill_routers(gm, ctx)
    assert "ppcompile_distill" not in gm.meta and sorted(gm.meta["ppcompile_dense"]) == [0]
    assert all(f.sample is not None for f in gm.meta["ppcompile_ffns"])
    assert all(torch.equal(f.state.router_w, w) for f, w in zip(gm.meta["ppcompile_ffns"], routers))


@pytest.mark.parametrize("distill_epochs", [0, 1])
def test_choose_temperature_scales_routers_by_the_best_measured_temperature(distill_epochs):
    """Only the routers change, by one positive factor 1 / T (expert rankings, hence topk and
    static, unchanged); T is the candidate with the lowest reported check loss, and that loss is
    what the final routers give; tau = 1 keeps every expert; samples and dense outputs go."""
    tr = importlib.import_module("ppcompile.passes.train_routers")
    model, gm, ctx = planned_graph(distill_epochs=distill_epochs)
    gm = distill_routers(gm, ctx)
    ffns = gm.meta["ppcompile_ffns"]
    planned = [(f, f.weights(ctx.values)) for f in ffns]
    before = [(f.state.router_w.clone(), f.state.router_b.clone()) for f in ffns]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    counts = op_counts(gm)
    batch = tr.calibration_batches(gm, ctx)[0]
    dense, kept = gm.meta["ppcompile_dense"][0], gm.meta["ppcompile_budget"]["kept"]
    sparse = tr.sparse_copy(gm, planned)
    samples = [f.sample for f in ffns]
    gm = choose_temperature(gm, ctx)
    assert op_counts(gm) == counts
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    report = gm.meta["ppcompile_temperature"]
    losses = report["losses"]
    assert len(losses) >= 3 and 1.0 in losses
    score = {c: sum(math.log(v) for v in found) for c, found in losses.items()}
    if report["table"] is None:
        t = report["chosen"]
        assert score[t] == min(score.values())
    else:  # a temperature per operating point: the best one at each check fraction
        temps = report["table"][1].tolist()
        for end, i in ((temps[0], 0), (temps[-1], -1)):  # ties go to temperature 1
            assert end == pytest.approx(min(losses, key=lambda c: (losses[c][i], c != 1.0)))
        t = ffns[0].state.temperature(ctx.options.tau)
        assert not kept
    for f, (w, b) in zip(ffns, before):
        assert torch.allclose(f.state.router_w, w / t) and torch.allclose(f.state.router_b, b / t)
        assert (f.state.tau_table is not None) == kept
        assert float(f.state.tau) == pytest.approx(f.state.ffn_tau(ctx.options.tau))
    if report["table"] is not None:
        return
    # the final routers and tables give the reported loss at the lower check fraction
    curves = [tr.budget_curve(sample, f.state.router_w, f.state.router_b)
              for sample, f in zip(samples, ffns)]
    width = tr.LOGITS_WIDTH * max(f.d_model for f in ffns)
    low = tr.model_tau_for(curves, [f.d_ff for f in ffns], tr.CHECK_FRACTIONS[0])
    assert tr.sparse_loss(sparse, planned, low, batch, dense, width) == pytest.approx(
        report["losses"][t][0], rel=1e-6)
    x = torch.randn(50, ffns[0].d_model)
    logits = torch.nn.functional.linear(x, *before[0])
    new = torch.nn.functional.linear(x, ffns[0].state.router_w, ffns[0].state.router_b)
    assert torch.equal(logits.argsort(dim=-1, stable=True), new.argsort(dim=-1, stable=True))
    gm = choose_temperature(gm, ctx)  # nothing planned with a sample now: a no-op
    assert all(f.sample is None for f in ffns) and "ppcompile_dense" not in gm.meta


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "falcon", "bert"])
def test_rewrite_replaces_each_ffn_by_one_sparse_node(family):
    model, gm, ctx = setup(family)
    for p in (find_ffns, attach_plans, calibrate, build_experts, train_routers):
        gm = p(gm, ctx)
    before = op_counts(gm)
    gm = rewrite(gm, ctx)
    after = op_counts(gm)
    n = 2
    assert after["sparse_ffn"] == n
    projections_per_ffn = {"llama": 3, "gpt2": 2, "phi3": 2, "falcon": 2, "bert": 2}[family]
    removed = sum(before[k] - after[k] for k in LINEAR_LIKE)
    assert removed == n * projections_per_ffn
    assert after["placeholder"] == before["placeholder"] + 4 * n
    act = {"llama": "silu", "phi3": "silu", "gpt2": "tanh", "falcon": "gelu", "bert": "gelu"}[family]
    assert after[act] == before[act] - n
    assert after["add_"] == n
    # numerics of the rewritten graph against the dense graph, tau = 1
    extras = [getattr(s, k) for s in (f.state for f in gm.meta["ppcompile_ffns"])
              for k in ("router_w", "router_b", "tau", "stats")]
    for f in gm.meta["ppcompile_ffns"]:
        f.state.set_tau(1.0)
    with torch.no_grad():
        got = gm(*ctx.example_inputs, *extras)
        want = logits_of(model(IDS))
    outputs = got if isinstance(got, (tuple, list)) else [got]
    (got,) = [o for o in outputs if isinstance(o, torch.Tensor) and o.shape == want.shape]
    assert rel_err(got, want) < 1e-5


def test_plan_precision_stays_float32_for_constants_beyond_bfloat16(monkeypatch):
    """DeBERTa masks attention scores with float32's minimum, which bfloat16 cannot hold: the
    plan passes' runs of such a graph stay in float32 even where bfloat16 is native."""
    calibrate_module = importlib.import_module("ppcompile.passes.calibrate")
    monkeypatch.setattr(calibrate_module, "cpu_multiplies_bf16", lambda: True)

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

        def forward(self, x):
            x = x.masked_fill(x > 3, torch.finfo(torch.float32).min)
            return self.down(torch.nn.functional.gelu(self.up(x)))

    x = torch.randn(2, 8, 16)
    gm, example = capture(Masked().eval(), x)
    weights = [(None, {"w_down": torch.zeros(2, 2)})]
    assert calibrate_module.beyond_bf16(gm)
    assert not calibrate_module.plan_precision(gm, weights)._enabled
    gm_ok, _ = capture(_SharedFFN().eval(), x)
    assert not calibrate_module.beyond_bf16(gm_ok)
    assert calibrate_module.plan_precision(gm_ok, weights)._enabled

class _SharedFFN(torch.nn.Module):
    """One GELU FFN module applied twice (shared weights), as weight-tied layers do."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        x = x + self.down(torch.nn.functional.gelu(self.up(x)))
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def test_ffn_applied_twice_is_planned_once_and_rewritten_at_both_uses():
    model = _SharedFFN().eval()
    x = torch.randn(2, 8, 16)
    gm, example = capture(model, x)
    opts = Options.from_dict({"calibration": torch.randn(16, 8, 16), "expert_size": 8,
                              "distill_epochs": 0})
    ctx = Context(example, graph_tensors(gm, example), opts, {})
    gm = find_ffns(gm, ctx)
    assert len(gm.meta["ppcompile_ffns"]) == 1 and len(gm.meta["ppcompile_twins"]) == 1
    for p in (attach_plans, calibrate, build_experts, train_routers):
        gm = p(gm, ctx)
    before = op_counts(gm)
    gm = rewrite(gm, ctx)
    after = op_counts(gm)
    assert after["sparse_ffn"] == 2 and after["gelu"] == before["gelu"] - 2
    assert after["placeholder"] == before["placeholder"] + 4  # one plan's inputs, used twice
    assert gm.meta["ppcompile_inputs"] == [gm.meta["ppcompile_inputs"][0]]
    state = gm.meta["ppcompile_ffns"][0].state
    state.set_tau(1.0)
    with torch.no_grad():
        got = gm(*example, state.router_w, state.router_b, state.tau, state.stats)
        got = got[0] if isinstance(got, (tuple, list)) else got
        assert rel_err(got, model(x)) < 1e-5

def test_lower_to_triton_folds_the_statistics_add_into_the_op(monkeypatch):
    """On CUDA weights each sparse_ffn node and the stats.add_ after it become one triton_op node
    that writes the statistics itself (here the weights are on the CPU: the pass is told they are
    on a GPU; the numbers are checked on the GPU, tests/test_gpu.py)."""
    from ppcompile.kernels import gpu_op

    lowering = importlib.import_module("ppcompile.passes.lower_to_triton")
    if not gpu_op.AVAILABLE:
        pytest.skip("needs triton")
    _, gm, ctx = setup("llama")
    for p in (find_ffns, attach_plans, calibrate, build_experts, train_routers, rewrite):
        gm = p(gm, ctx)
    before = op_counts(gm)
    monkeypatch.setattr(lowering, "on_gpu", lambda t: True)
    with torch.no_grad():  # a graph compiled for inference (see the next test)
        gm = lowering.lower_to_triton(gm, ctx)
    after = op_counts(gm)
    n = 2
    assert (before["sparse_ffn"], before["add_"]) == (n, n)
    assert (after["sparse_ffn"], after["sparse_ffn_triton"], after["add_"]) == (0, n, 0)
    assert after["getitem"] == before["getitem"] - 2 * n
    assert after["placeholder"] == before["placeholder"]
    for node in gm.graph.nodes:
        if node.target is torch.ops.ppcompile.sparse_ffn_triton.default:
            stats = node.args[10]  # after tau, the statistics input the op now adds into
            assert stats.op == "placeholder" and stats.name.endswith("_stats")
            assert list(stats.users) == [node]


def test_lower_to_triton_keeps_the_reference_op_where_gradients_are_wanted(monkeypatch):
    """A graph compiled in grad mode with weights that require grad gets a backward from AOT
    autograd; the triton_op (it writes its statistics in place) can have no autograd formula,
    so the reference op, which has one, stays, with a warning naming the way to the kernels."""
    from ppcompile.kernels import gpu_op

    lowering = importlib.import_module("ppcompile.passes.lower_to_triton")
    if not gpu_op.AVAILABLE:
        pytest.skip("needs triton")
    _, gm, ctx = setup("llama")
    assert any(isinstance(t, torch.Tensor) and t.requires_grad for t in ctx.example_inputs)
    for p in (find_ffns, attach_plans, calibrate, build_experts, train_routers, rewrite):
        gm = p(gm, ctx)
    before = op_counts(gm)
    monkeypatch.setattr(lowering, "on_gpu", lambda t: True)
    with torch.enable_grad(), pytest.warns(UserWarning, match=r"torch\.no_grad\(\)"):
        gm = lowering.lower_to_triton(gm, ctx)
    assert op_counts(gm) == before and before["sparse_ffn"] == 2
    assert gm.meta["ppcompile_relayout"] == []


def test_balanced_assign_respects_capacity_and_prefers_high_scores():
    score = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.0]])
    assert balanced_assign(score, 2).tolist() == [0, 0, 1, 1]
    z = torch.nn.functional.normalize(torch.randn(96, 10), dim=1)
    assign = balanced_kmeans(z, 12, 8, torch.Generator().manual_seed(0))
    assert torch.bincount(assign).tolist() == [8] * 12


def test_calibrate_weights_tokens_by_their_share_of_the_residual_stream():
    _, gm, ctx = setup("llama")
    gm = calibrate(attach_plans(find_ffns(gm, ctx), ctx), ctx)
    for f in gm.meta["ppcompile_ffns"]:
        assert residual_add(gm.graph, f.down.node) is not None
        w = f.sample["weight"]
        assert w.shape == (f.sample["x"].shape[0],)
        assert ((w >= 0) & (w <= 1)).all() and (w < 1).any()


@pytest.mark.parametrize("kept", [True, False])
def test_train_routers_fits_layer_budgets_that_keep_tau_one_dense(kept, monkeypatch):
    module = importlib.import_module("ppcompile.passes.train_routers")
    real = module.check_budget
    monkeypatch.setattr(module, "check_budget", lambda *a: {**real(*a), "kept": kept})
    model, gm, ctx = setup("llama", tau=0.5)
    for p in (find_ffns, attach_plans, calibrate, build_experts, train_routers):
        gm = p(gm, ctx)
    verdict = gm.meta["ppcompile_budget"]
    assert len(verdict["budget"]) == len(verdict["model_tau"]) == 2
    for s in [f.state for f in gm.meta["ppcompile_ffns"]]:
        assert float(s.model_tau) == 0.5 and float(s.tau) == pytest.approx(s.ffn_tau(0.5))
        assert s.tau_input("prunepath") is s.tau
        assert all(s.tau_input(m) is s.model_tau for m in ("topk", "static", "oracle"))
        if kept:
            grid, own = s.tau_table
            assert grid[-1] == 1.0 and own[-1] == 1.0 and (own.diff() >= 0).all()
        else:
            assert s.tau_table is None and s.ffn_tau(0.37) == 0.37
        s.set_tau(1.0)
        assert float(s.tau) == 1.0 and float(s.model_tau) == 1.0
        taus = [s.ffn_tau(t) for t in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99)]
        assert taus == sorted(taus)


def test_budget_check_compares_sparse_outputs_with_dense():
    model, gm, ctx = setup("llama", tau=0.5)
    for p in (find_ffns, attach_plans, calibrate, build_experts, train_routers):
        gm = p(gm, ctx)
    verdict = gm.meta["ppcompile_budget"]
    assert all(e > 0 for e in verdict["budget"] + verdict["model_tau"])  # sparse != dense
    assert verdict["kept"] == (sum(math.log(b / g) for b, g in
                                   zip(verdict["budget"], verdict["model_tau"])) < 0)


def test_layer_budgets_spend_the_budget_where_dropping_costs_most():
    fraction = torch.linspace(0.05, 1.0, len(TAU_GRID)).double()
    cheap = (1 - fraction) ** 2
    tables = layer_budgets([(fraction, 10 * cheap), (fraction, cheap)], [64, 64])
    middle = len(TAU_GRID) // 2
    assert tables[0][middle] > TAU_GRID[middle] > tables[1][middle]  # costly FFN keeps more
    spent = (fraction[TAU_GRID.tolist().index(tables[0][middle].item())]
             + fraction[TAU_GRID.tolist().index(tables[1][middle].item())]) / 2
    assert spent <= fraction[middle] + 1e-9  # within the budget of the unchanged tau
    assert all(t[-1] == 1.0 for t in tables)


def test_temperature_table_follows_tau(monkeypatch):
    """Where the best temperature differs between the check fractions (and the layer budget is
    dropped), each FFN gets a table: its router at temperature 1 divided by T(tau), rewritten in
    place by set_tau; T is the lower fraction's best up to its tau, the higher's from its tau."""
    ct = importlib.import_module("ppcompile.passes.choose_temperature")
    designed = iter([3.0, 1.0, 2.0, 2.0, 1.0, 3.0, 4.0, 4.0])  # T = 0.75, 1, 1.5, 2 x (lo, hi)
    monkeypatch.setattr(ct, "TEMPERATURES", (0.75, 1.0, 1.5, 2.0))
    monkeypatch.setattr(ct, "sparse_loss", lambda *a: next(designed))
    monkeypatch.setattr(ct, "_fraction_grows", lambda *a: True)
    _, gm, ctx = planned_graph(distill_epochs=0)
    gm.meta["ppcompile_budget"]["kept"] = False
    ffns = gm.meta["ppcompile_ffns"]
    before = [(f.state.router_w.clone(), f.state.router_b.clone()) for f in ffns]
    gm = choose_temperature(gm, ctx)
    report = gm.meta["ppcompile_temperature"]
    table = report["table"]
    tau_lo, tau_hi = report["taus"][1.5][0], report["taus"][0.75][-1]
    assert tau_lo < tau_hi, "the tiny model's check taus should be ordered"
    assert table is not None and table[0, 0] == pytest.approx(tau_lo)
    assert table[0, -1] == pytest.approx(tau_hi)
    state, (w, b) = ffns[0].state, before[0]
    for tau, t in [(tau_lo - 0.05, 1.5), (tau_lo, 1.5), (tau_hi, 0.75), (0.99, 0.75)]:
        state.set_tau(tau)
        assert state.temperature(tau) == pytest.approx(t, rel=1e-5)
        assert torch.allclose(state.router_w, w / t) and torch.allclose(state.router_b, b / t)
    mid = (tau_lo + tau_hi) / 2
    state.set_tau(mid)
    assert 0.75 < state.temperature(mid) < 1.5
    assert torch.equal(state.router_at_one()[0], w.float())


def test_schedule_and_fraction_check():
    ct = importlib.import_module("ppcompile.passes.choose_temperature")
    table = ct._schedule(0.5, 2.0, 0.9, 0.5, steps=4)
    assert table.shape == (2, 5)
    assert table[1, 0] == pytest.approx(2.0) and table[1, -1] == pytest.approx(0.5)
    assert table[1, 2] == pytest.approx(1.0)  # log-linear: the geometric mean halfway
    _, gm, ctx = planned_graph(distill_epochs=0)
    planned = [(f, f.weights(ctx.values)) for f in gm.meta["ppcompile_ffns"]]
    base = [(f.state.router_w, f.state.router_b) for f, _ in planned]
    widths = [f.d_ff for f, _ in planned]
    flat = torch.stack([torch.linspace(0.3, 0.9, 5), torch.ones(5)]).float()
    assert ct._fraction_grows(planned, base, flat, widths)  # one temperature: tau decides
    # from near-uniform at tau 0.3 to very peaked at 0.9: the mean fraction falls as tau grows
    steep = torch.stack([torch.tensor([0.3, 0.9]), torch.tensor([100.0, 0.01])]).float()
    assert not ct._fraction_grows(planned, base, steep, widths)
