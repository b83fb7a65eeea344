import pytest
import torch
import torch._dynamo


@pytest.fixture(autouse=True)
def fresh_dynamo(tmp_path, monkeypatch):
    """Every test starts with empty dynamo caches, an empty plan cache and a fixed seed."""
    monkeypatch.setenv("PPCOMPILE_CACHE_DIR", str(tmp_path / "plans"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def capture(model, *inputs):
    """The dynamo graph and example inputs that a backend would receive for model(*inputs)."""
    seen = []

    def backend(gm, example_inputs, **_):
        seen.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(*inputs)
    assert len(seen) == 1, f"expected one graph, got {len(seen)}"
    return seen[0]


def logits_of(output):
    """The main tensor of a HF model output (logits, or last hidden state for encoders)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    raise TypeError(type(output))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
