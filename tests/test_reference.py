"""The torch reference of the sparse FFN and its custom op: selection rule, tau=1 is dense,
autograd."""
import pytest
import torch
import torch.nn.functional as F

from ppcompile.kernels import ops  # noqa: F401
from ppcompile.kernels.reference import ACTIVATIONS, select_experts, sparse_ffn_reference


def test_select_keeps_the_expert_that_crosses_tau():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert select_experts(logits, 0.5).tolist() == [[True, False, False]]
    assert select_experts(logits, 0.51).tolist() == [[True, True, False]]
    assert select_experts(logits, 0.8).tolist() == [[True, True, False]]
    assert select_experts(logits, 0.81).tolist() == [[True, True, True]]


def test_select_keeps_at_least_one_and_all_at_tau_one():
    logits = torch.randn(100, 16) * 30  # very peaked: tiny probabilities underflow to 0
    assert (select_experts(logits, 1e-6).sum(1) >= 1).all()
    assert select_experts(logits, 1.0).all()
    assert select_experts(logits, torch.tensor(1.0)).all()


def test_select_is_monotone_in_tau():
    logits = torch.randn(50, 32)
    counts = [select_experts(logits, t).sum().item() for t in (0.2, 0.5, 0.8, 0.95)]
    assert counts == sorted(counts) and counts[0] < counts[-1]


def _ffn(d=16, f=32, gated=True, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return dict(w_up=r(f, d), b_up=r(f) if bias else None, w_gate=r(f, d) if gated else None,
                b_gate=r(f) if bias and gated else None, w_down=r(d, f),
                b_down=r(d) if bias else None, router_w=r(f // 8, d), router_b=r(f // 8))


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("gated", [True, False])
def test_tau_one_is_the_dense_ffn(activation, gated):
    w = _ffn(gated=gated)
    x = torch.randn(2, 5, 16)
    y, counts = sparse_ffn_reference(x, **w, tau=torch.tensor(1.0), activation=activation,
                                     expert_size=8)
    act = ACTIVATIONS[activation]
    h = act(F.linear(x, w["w_up"], w["b_up"])) if not gated else \
        act(F.linear(x, w["w_gate"], w["b_gate"])) * F.linear(x, w["w_up"], w["b_up"])
    dense = F.linear(h, w["w_down"], w["b_down"])
    assert torch.equal(y, dense)
    assert counts.tolist() == [10 * 32, 10]


def test_dropped_experts_contribute_nothing():
    w = _ffn(bias=True)
    x = torch.randn(7, 16)
    y, counts = sparse_ffn_reference(x, **w, tau=torch.tensor(0.3), activation="silu",
                                     expert_size=8)
    keep = select_experts(F.linear(x, w["router_w"], w["router_b"]), 0.3)
    h = F.silu(F.linear(x, w["w_gate"], w["b_gate"])) * F.linear(x, w["w_up"], w["b_up"])
    h = h * keep.repeat_interleave(8, 1)
    torch.testing.assert_close(y, F.linear(h, w["w_down"], w["b_down"]))
    assert counts[0].item() == keep.sum().item() * 8


def test_op_backward_matches_dense_at_tau_one():
    w = {k: (v.requires_grad_(True) if v is not None and k not in ("router_w", "router_b") else v)
         for k, v in _ffn(dtype=torch.float64).items()}
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    y, _ = torch.ops.ppcompile.sparse_ffn(x, *w.values(), torch.tensor(1.0), "gelu", 8, "prunepath")
    y.square().sum().backward()
    got = [x.grad] + [w[k].grad for k in ("w_up", "w_gate", "w_down", "b_up")]
    for t in [x] + list(w.values()):
        if t is not None:
            t.grad = None
    h = F.gelu(F.linear(x, w["w_gate"], w["b_gate"])) * F.linear(x, w["w_up"], w["b_up"])
    F.linear(h, w["w_down"], w["b_down"]).square().sum().backward()
    want = [x.grad] + [w[k].grad for k in ("w_up", "w_gate", "w_down", "b_up")]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["prunepath", "topk", "oracle"])
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_op_takes_zero_tokens(shape, method):
    w = _ffn()
    x = torch.randn(*shape, requires_grad=True)
    y, counts = torch.ops.ppcompile.sparse_ffn(x, *w.values(), torch.tensor(0.5), "silu", 8, method)
    assert y.shape == x.shape and counts.tolist() == [0.0, 0.0]
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("change, words", [
    (dict(activation="swish"), ["'swish'", "allowed", "silu", "gelu_tanh"]),
    (dict(method="top-k"), ["'top-k'", "allowed", "prunepath"]),
    (dict(expert_size=0), ["expert_size=0", ">= 1", "d_ff=32"]),
    (dict(expert_size=5), ["expert_size=5", "divide d_ff=32"]),
    (dict(expert_size=16), ["router_w has 4 rows", "2 experts"]),  # the router is for size 8
])
def test_op_refuses_arguments_that_describe_no_sparse_ffn(change, words):
    args = {**dict(activation="silu", expert_size=8, method="prunepath"), **change}
    x = torch.randn(3, 16)
    with pytest.raises(Exception) as err:
        torch.ops.ppcompile.sparse_ffn(x, *_ffn().values(), torch.tensor(0.5), args["activation"],
                                       args["expert_size"], args["method"])
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    with pytest.raises(Exception) as err:  # and at trace time, from the op's fake
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = [mode.from_tensor(t) if t is not None else None for t in _ffn().values()]
            torch.ops.ppcompile.sparse_ffn(mode.from_tensor(x), *fake, mode.from_tensor(
                torch.tensor(0.5)), args["activation"], args["expert_size"], args["method"])
    assert words[0] in str(err.value)


@pytest.mark.parametrize("change, words", [
    (dict(w_up=torch.randn(32, 24)), ["w_up has shape (32, 24)", "(32, 16)"]),
    (dict(w_gate=torch.randn(64, 16)), ["w_gate has shape (64, 16)", "(32, 16)"]),
    (dict(w_down=torch.randn(16, 48)), ["w_down has shape (16, 48)", "(16, 32)"]),
    (dict(router_w=torch.randn(4, 24)), ["router_w has shape (4, 24)", "(4, 16)"]),
    (dict(b_up=torch.randn(64)), ["b_up has shape (64,)", "(32,)"]),
    (dict(b_down=torch.randn(8)), ["b_down has shape (8,)", "(16,)"]),
    (dict(router_b=torch.randn(3)), ["router_b has shape (3,)", "(4,)"]),
    (dict(w_gate=None), ["b_gate is given without w_gate"]),
])
def test_op_refuses_weights_of_the_wrong_shape(change, words):
    """Shapes that do not fit together are refused by name, by the op and at trace time by its
    fake (the kernels index the weights by these shapes: a mismatch would read other rows)."""
    w = {**_ffn(), **change}
    x = torch.randn(3, 16)
    for run in ("op", "fake"):
        with pytest.raises(ValueError) as err:
            if run == "op":
                torch.ops.ppcompile.sparse_ffn(x, *w.values(), torch.tensor(0.5), "silu", 8,
                                               "prunepath")
            else:
                with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
                    fake = [mode.from_tensor(t) if t is not None else None for t in w.values()]
                    torch.ops.ppcompile.sparse_ffn(mode.from_tensor(x), *fake, mode.from_tensor(
                        torch.tensor(0.5)), "silu", 8, "prunepath")
        for word in words:
            assert word in str(err.value), (run, word, str(err.value))


def test_topk_rounds_tau_as_the_float32_the_kernels_read():
    """round(tau * E) is taken of tau's float32 value however tau is given: 0.35 of 10 experts is
    0.34999999 of them, so 3 (a float64 0.35 would keep 4), on every path."""
    from ppcompile.kernels.reference import select_top_fraction
    logits = torch.randn(5, 10)
    for tau in (0.35, torch.tensor(0.35, dtype=torch.float64), torch.tensor(0.35)):
        assert select_top_fraction(logits, tau).sum(1).tolist() == [3] * 5
    assert not select_top_fraction(logits, float("nan")).any()


def test_op_computes_in_its_inputs_dtype_under_autocast():
    """Under a caller's autocast the op computes as its fake says and compiled graphs run it: in
    x's dtype (its projections would otherwise come out bfloat16 and select other experts)."""
    w = _ffn()
    x = torch.randn(6, 16)
    args = (x, *w.values(), torch.tensor(0.5), "silu", 8, "prunepath")
    want, _ = torch.ops.ppcompile.sparse_ffn(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = torch.ops.ppcompile.sparse_ffn(*args)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_op_refuses_second_derivatives():
    """Its backward is not differentiable: create_graph=True says so instead of dropping the
    second-order terms."""
    w = _ffn()
    x = torch.randn(4, 16, requires_grad=True)
    y, _ = torch.ops.ppcompile.sparse_ffn(x, *w.values(), torch.tensor(0.5), "silu", 8,
                                          "prunepath")
    (grad,) = torch.autograd.grad(y.sum(), x)  # first derivatives as before
    assert grad.shape == x.shape
    y, _ = torch.ops.ppcompile.sparse_ffn(x, *w.values(), torch.tensor(0.5), "silu", 8,
                                          "prunepath")
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
