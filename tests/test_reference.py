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
