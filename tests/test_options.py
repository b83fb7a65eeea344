"""Bad options fail early with a message that names the option, the value and what is allowed."""
import importlib

import pytest
import torch

import ppcompile
from ppcompile import OptionError, Options
from tiny_models import tiny_model


@pytest.mark.parametrize("options, words", [
    ({"tau": 0.0}, ["'tau'", "(0, 1]", "0.0"]),
    ({"tau": 1.5}, ["'tau'", "(0, 1]", "1.5"]),
    ({"tau": -0.1}, ["'tau'", "(0, 1]"]),
    ({"tau": float("nan")}, ["'tau'", "nan"]),
    ({"tau": "0.9"}, ["'tau'", "float", "str"]),
    ({"tau": True}, ["'tau'", "float", "bool"]),
    ({"tau": 10**400}, ["'tau'", "(0, 1]"]),  # beyond float's range
    ({"tau": 1e-300}, ["'tau'", "float32", "1.4e-45", "1e-300"]),  # 0 as float32
    ({"taw": 0.9}, ["unknown option", "'taw'", "tau"]),
    ({"expert_size": 0}, ["'expert_size'", ">= 1", "0"]),
    ({"expert_size": 8.0}, ["'expert_size'", "int", "float"]),
    ({"calibration_tokens": 10}, ["'calibration_tokens'", ">= 64"]),
    ({"distill_epochs": -1}, ["'distill_epochs'", ">= 0", "-1"]),
    ({"distill_epochs": 1.5}, ["'distill_epochs'", "int", "float"]),
    ({"seed": -1}, ["'seed'", ">= 0", "-1"]),
    ({"seed": 2**64}, ["'seed'", "[0, 9223372036854775807]", str(2**64)]),
    ({"method": "top-k"}, ["'method'", "'prunepath'", "'topk'", "'static'", "'oracle'", "top-k"]),
    ({"calibration": [[1, 2, 3]]}, ["'calibration'", "torch.Tensor", "list"]),
    ({"calibration": torch.zeros(4, 8, dtype=torch.long, device="meta")}, ["'calibration'", "meta"]),
    ({"calibration": torch.ones(4, 8, dtype=torch.bool)}, ["'calibration'", "torch.bool", "integer"]),
    ({"plan": 3}, ["'plan'", "path", "int"]),
    ({"calibration": torch.ones(4, 8, dtype=torch.long).to_sparse()},
     ["'calibration'", "sparse", "to_dense()"]),
])
def test_bad_options_are_named(options, words):
    with pytest.raises(OptionError) as err:
        Options.from_dict(options)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_options_not_a_dict():
    with pytest.raises(OptionError, match="must be a dict"):
        Options.from_dict([("tau", 0.9)])


def test_defaults_are_valid_and_documented():
    opts = Options.from_dict(None)
    assert 0 < opts.tau <= 1
    for name in Options.__dataclass_fields__:
        assert f"{name}:" in Options.__doc__, f"option {name} is not documented"


def test_bad_option_fails_at_compile_time():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="prunepath", options={"tau": 2.0})
    with pytest.raises(Exception, match="'tau' must be a float in \\(0, 1\\]"):
        compiled(torch.randint(0, 128, (1, 8)))


def test_set_tau_validates():
    model = tiny_model("llama")
    with pytest.raises(OptionError, match="'tau'"):
        ppcompile.set_tau(model, 0)
    with pytest.raises(TypeError, match="torch.compile"):
        ppcompile.set_tau(lambda x: x, 0.5)


def test_calibration_that_fits_no_input_is_refused():
    model = tiny_model("llama")
    bad = torch.randn(4, 16, 7)  # float data, but the model takes token ids
    compiled = torch.compile(model, backend="prunepath", options={"calibration": bad})
    with pytest.raises(Exception, match="option 'calibration'.*fits none"):
        compiled(torch.randint(0, 128, (1, 8)))


def test_calibration_shorter_than_traced_input_is_refused():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="prunepath",
                             options={"calibration": torch.randint(0, 128, (8, 4))})
    with pytest.raises(Exception, match="shorter than the traced input length 8"):
        compiled(torch.randint(0, 128, (1, 8)))


def test_expert_size_must_divide_d_ff(monkeypatch):
    module = importlib.import_module("ppcompile.passes.calibrate")
    calls = []
    monkeypatch.setattr(module, "calibration_batches", lambda *a: calls.append(1))
    model = tiny_model("llama")  # d_ff = 64
    compiled = torch.compile(model, backend="prunepath", options={
        "expert_size": 24, "calibration": torch.randint(0, 128, (8, 8))})
    with pytest.raises(Exception, match="'expert_size'=24 does not divide d_ff=64.*32"):
        compiled(torch.randint(0, 128, (1, 8)))
    assert calls == []  # refused before calibrating


def test_numpy_numbers_are_python_numbers():
    np = pytest.importorskip("numpy")
    opts = Options.from_dict({"tau": np.float32(0.5), "expert_size": np.int64(16),
                              "seed": np.int32(3)})
    assert (opts.tau, opts.expert_size, opts.seed) == (0.5, 16, 3)
    assert type(opts.tau) is float and type(opts.expert_size) is int and type(opts.seed) is int
    assert type(Options(tau=1).tau) is float


def test_set_tau_before_the_first_call_warns_and_report_says_why_it_is_empty():
    compiled = torch.compile(tiny_model("llama"), backend="prunepath", options={"tau": 0.9})
    with pytest.warns(UserWarning, match="first call.*options=\\{'tau'"):
        ppcompile.set_tau(compiled, 0.5)
    assert "yet" in str(ppcompile.report(compiled))


def test_plan_options_beside_a_plan_file_must_match_it(tmp_path):
    model = tiny_model("llama")
    calib = torch.randint(0, 128, (24, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 128, (1, 8))
    compiled = torch.compile(model, backend="prunepath", options={
        "tau": 0.6, "calibration": calib, "expert_size": 8, "distill_epochs": 0})
    compiled(ids)
    path = tmp_path / "plan.safetensors"
    ppcompile.save_plan(compiled, path)
    torch._dynamo.reset()
    again = torch.compile(tiny_model("llama"), backend="prunepath",
                          options={"plan": str(path), "expert_size": 16})
    with pytest.raises(Exception, match="'expert_size'=16 differs from 8.*plan"):
        again(ids)
    torch._dynamo.reset()
    as_options = torch.compile(tiny_model("llama"), backend="prunepath",
                               options=Options(plan=str(path), expert_size=16))
    with pytest.raises(Exception, match="'expert_size'=16 differs from 8.*plan"):
        as_options(ids)
    torch._dynamo.reset()
    same = torch.compile(tiny_model("llama"), backend="prunepath",
                         options={"plan": str(path), "expert_size": 8, "distill_epochs": 0})
    same(ids)


def test_a_missing_plan_file_is_named_and_read_only_when_a_plan_is_needed(tmp_path):
    missing = torch.compile(tiny_model("llama"), backend="prunepath",
                            options={"plan": str(tmp_path / "no_such_plan.safetensors")})
    with pytest.raises(Exception, match="option 'plan': no plan file at .*no_such_plan"):
        missing(torch.randint(0, 128, (1, 8)))
    torch._dynamo.reset()
    model = tiny_model("llama")
    planned = torch.compile(model, backend="prunepath", options={
        "tau": 0.6, "calibration": torch.randint(0, 128, (24, 32)), "distill_epochs": 0})
    planned(torch.randint(0, 128, (1, 8)))
    path = tmp_path / "plan.safetensors"
    ppcompile.save_plan(planned, path)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="prunepath", options={"plan": str(path)})
    compiled(torch.randint(0, 128, (1, 8)))
    path.unlink()  # the FFNs carry the plan now: a recompile for a new length needs no file
    compiled(torch.randint(0, 128, (1, 5)))
    assert ppcompile.report(compiled).rows


def test_calibration_ids_outside_the_vocabulary_are_named():
    compiled = torch.compile(tiny_model("llama"), backend="prunepath", options={
        "calibration": torch.randint(1000, 2000, (8, 8))})  # the vocabulary has 128 tokens
    with pytest.raises(Exception, match="option 'calibration'.*IndexError.*1\\d\\d\\d\\.\\.1\\d\\d\\d"):
        compiled(torch.randint(0, 128, (1, 8)))


def test_inductor_modes_are_refused_with_what_to_use():
    compiled = torch.compile(tiny_model("llama"), backend="prunepath", mode="reduce-overhead")
    with pytest.raises(Exception, match="mode='reduce-overhead'.*'cudagraphs'"):
        compiled(torch.randint(0, 128, (1, 8)))


def test_numpy_scalars_are_taken_as_python_ones():
    np = pytest.importorskip("numpy")
    opts = Options.from_dict({"tau": np.float32(0.5), "expert_size": np.int64(16),
                              "cudagraphs": np.bool_(False), "cache": np.bool_(True)})
    assert (opts.tau, opts.expert_size, opts.cudagraphs, opts.cache) == (0.5, 16, False, True)
    assert all(type(v) in (float, int, bool) for v in (opts.tau, opts.expert_size,
                                                       opts.cudagraphs, opts.cache))
