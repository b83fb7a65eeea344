import pytest
import torch
import torch._dynamo


def pytest_collection_finish(session):
    """The Triton kernels' interpreter run (a subprocess) starts as soon as the session knows it
    will run it, so that it runs beside the other tests instead of after them."""
    if session.config.option.collectonly:
        return
    for item in session.items:
        if item.name == "test_in_interpreter_subprocess":
            item.module.start_interpreter_run()


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
