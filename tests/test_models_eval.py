"""Offline tests of models.py, evaluate.py and the CLI: tiny random models and a tokenizer trained
in the test; no model cache, no network."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import ppcompile
from ppcompile import cli, evaluate, models
from tiny_models import VOCAB, tiny_model

SENTENCES = [
    "the cat sat on the mat and the dog sat on the log",
    "a quick brown fox jumps over the lazy dog",
    "tokens are cut into windows of the same length",
    "sparse experts keep the dense function at tau one",
] * 3


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on SENTENCES, small enough for the tiny models' vocab."""
    tok = Tokenizer(tok_models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<bos>"])
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>")


TEXT = " ".join(SENTENCES)


# ------------------------------------------------------------------------------ token_windows

def test_token_windows_are_consecutive_and_non_overlapping():
    tok = tiny_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    w = evaluate.token_windows(tok, TEXT, 8)
    assert w.dtype == torch.long and w.shape == (len(ids) // 8, 8)
    assert w.flatten().tolist() == ids[:w.numel()]
    assert evaluate.token_windows(tok, TEXT, 8, max_windows=3).tolist() == w[:3].tolist()


def test_token_windows_with_bos():
    tok = tiny_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    w = evaluate.token_windows(tok, TEXT, 8, bos=bos)
    assert w.shape == (len(ids) // 7, 8)
    assert (w[:, 0] == bos).all()
    assert w[:, 1:].flatten().tolist() == ids[:len(w) * 7]


def test_token_windows_errors_name_the_problem():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="too few for one window of 1000 tokens"):
        evaluate.token_windows(tok, "the cat", 1000)
    with pytest.raises(ValueError, match="max_windows"):
        evaluate.token_windows(tok, TEXT, 8, max_windows=0)


def test_bos_for_gemma_only():
    tok = tiny_tokenizer()
    assert evaluate.bos_for(tiny_model("gemma"), tok) == tok.bos_token_id
    assert evaluate.bos_for(tiny_model("llama"), tok) is None


# ------------------------------------------------------------------------------- perplexity

def windows(n=8, length=16, seed=1):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def test_perplexity_is_exp_of_mean_nll():
    model = tiny_model("llama")
    w = windows()
    with torch.no_grad():
        loss = model(input_ids=w, labels=w).loss  # HF: mean NLL over all shifted tokens
    assert evaluate.perplexity(model, w, batch_size=4) == pytest.approx(loss.exp().item(), rel=1e-5)


def test_perplexity_drops_the_last_partial_batch():
    model = tiny_model("llama")
    w = windows(n=10)
    assert evaluate.perplexity(model, w, 4) == evaluate.perplexity(model, w[:8], 4)
    with pytest.raises(ValueError, match="3 windows, batch_size 4"):
        evaluate.perplexity(model, w[:3], 4)


def test_perplexity_needs_logits():
    with pytest.raises(ValueError, match="needs a causal LM"):
        evaluate.perplexity(tiny_model("bert"), windows(), 4)


def test_perplexity_compiled_at_tau_1_matches_eager():
    model = tiny_model("llama")
    w = windows()
    dense = evaluate.perplexity(model, w, 4)
    options = {"tau": 1.0, "calibration": windows(n=16, seed=2), "expert_size": 8}
    compiled = torch.compile(model, backend="prunepath", options=options)
    sparse = evaluate.perplexity(compiled, w, 4)
    assert sparse == pytest.approx(dense, rel=1e-4)
    assert ppcompile.report(compiled).active_fraction == pytest.approx(1.0)
    graphs = counters["stats"]["unique_graphs"]
    ppcompile.set_tau(compiled, 0.5)
    evaluate.perplexity(compiled, w[:6], 4)  # the partial batch is dropped, not run
    assert ppcompile.report(compiled).active_fraction < 1.0
    assert counters["stats"]["unique_graphs"] == graphs, "perplexity made the model recompile"


def test_embedding_cosine():
    a, b = tiny_model("bert", seed=0), tiny_model("bert", seed=1)
    w = windows(n=4)
    assert evaluate.embedding_cosine(a, a, w, batch_size=2) == pytest.approx(1.0, abs=1e-6)
    assert evaluate.embedding_cosine(a, b, w, batch_size=2) < 0.999


# ----------------------------------------------------------------------------------- models

@pytest.mark.parametrize("family, cls", [("llama", "LlamaForCausalLM"), ("bert", "BertModel")])
def test_load_local_folder(tmp_path, family, cls):
    original = tiny_model(family)
    original.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, tok = models.load(str(tmp_path))
    assert type(model).__name__ == cls and not model.training
    assert next(model.parameters()).dtype == torch.float32
    w = windows(n=2)
    with torch.no_grad():
        assert torch.equal(model(input_ids=w)[0], original(input_ids=w)[0])
    assert tok("the cat")["input_ids"] == tiny_tokenizer()("the cat")["input_ids"]


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(ValueError, match="smollm2-135m, gemma3-270m, minilm-l6"):
        models.load("no-such-model")
    with pytest.raises(ValueError, match="unknown model name 'no-such-model'"):
        models.fetch("no-such-model")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        models.load(tmp_path)


def test_fetch_reuses_an_existing_folder(tmp_path):
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert models.fetch("smollm2-135m", root=tmp_path) == folder  # no download attempted


def test_gguf_parts_sort_numerically():
    parts = ["d/m.gguf.part10", "d/m.gguf.part2", "d/m.gguf.part1"]
    assert sorted(parts, key=models._part_number) == ["d/m.gguf.part1", "d/m.gguf.part2",
                                                      "d/m.gguf.part10"]


def test_missing_gguf_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(ImportError, match=r"pip install gguf accelerate"):
        models._write_from_gguf(tmp_path / "model.gguf", tmp_path)


# -------------------------------------------------------------------------------------- CLI

def test_demo_help(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["demo", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--taus", "--seq-len", "--calib-windows", "--eval-windows",
                 "--expert-size", "--batch-size"):
        assert flag in out


def test_demo_and_bench_reject_bad_arguments_naming_the_flag(capsys):
    for argv, words in [(["demo", "--taus", "1.5"], "argument --taus: expected a number in (0, 1]"),
                        (["demo", "--seq-len", "1"],
                         "argument --seq-len: expected an integer >= 2"),
                        (["bench", "--model", "x", "--fractions", "0"],
                         "argument --fractions: expected a number in (0, 1]")]:
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert words in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--eval-windows 4 is smaller than --batch-size 8"):
        cli.main(["demo", "--eval-windows", "4"])


def _tiny_llama_folder(path, tokenizer=True):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(path)
    if tokenizer:
        vocab = {"[UNK]": 0, **{chr(97 + i): i + 1 for i in range(26)}}
        tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


def test_demo_names_what_a_local_model_lacks(tmp_path):
    with pytest.raises(SystemExit, match="no usable tokenizer"):
        cli.main(["demo", "--model", str(_tiny_llama_folder(tmp_path / "a", tokenizer=False))])
    folder = _tiny_llama_folder(tmp_path / "b")  # FFN width 64
    with pytest.raises(SystemExit, match="--expert-size 7 does not divide the FFN width 64.*1, 2, 4"):
        cli.main(["demo", "--model", str(folder), "--expert-size", "7"])
    with pytest.raises(SystemExit, match="lower --seq-len"):
        cli.main(["demo", "--model", str(folder), "--seq-len", "10000000"])


@pytest.mark.parametrize("family, width", [("llama", 64), ("gpt2", 128), ("opt", 64),
                                           ("t5", 64), ("distilbert", 64), ("gptj", 128)])
def test_the_cli_reads_the_ffn_width_under_each_configs_name(family, width):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_models import FAMILIES

    config_cls, _, kwargs, _ = FAMILIES[family]
    assert cli._ffn_width(config_cls(**kwargs)) == width


def test_the_cli_finds_an_option_error_inside_torch_compiles_error():
    from ppcompile.options import OptionError

    try:
        try:
            raise OptionError("option 'expert_size'=7 does not divide 48")
        except OptionError as inner:
            raise RuntimeError("backend='prunepath' raised") from inner
    except RuntimeError as outer:
        assert "expert_size" in str(cli._option_error(outer))
    assert cli._option_error(RuntimeError("other")) is None
    with pytest.raises(SystemExit, match="ppcompile demo: option 'expert_size'=7"):
        with cli._exit_on_option_error("demo"):
            raise RuntimeError("backend='prunepath' raised") from OptionError(
                "option 'expert_size'=7 does not divide 48")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("ppcompile ")

def test_bench_help_and_no_gpu(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["bench", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--batches", "--fractions", "--new-tokens", "--expert-size",
                 "--host-profile", "--out"):
        assert flag in out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            cli.main(["bench", "--model", "llama3-1b"])


@pytest.mark.parametrize("name", ["llama3-1b", "llama3-8b", "smollm2-135m-shape"])
def test_bench_shapes_are_the_public_configs(name):
    from ppcompile import bench
    model = bench.random_llama(name, device="meta", layers=1)  # shapes only, no memory
    shape = bench.LLAMA_SHAPES[name]
    cfg = model.config
    assert cfg.hidden_size == shape["hidden_size"] and cfg.num_hidden_layers == 1
    mlp = model.model.layers[0].mlp
    assert tuple(mlp.gate_proj.weight.shape) == (shape["intermediate_size"], shape["hidden_size"])
    vocab = {"smollm2-135m-shape": 49152}.get(name, 128256)
    assert tuple(model.lm_head.weight.shape) == (vocab, shape["hidden_size"])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == shape["tie_word_embeddings"]


def test_python_m_ppcompile_runs():
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "ppcompile", "demo", "--help"], cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage: ppcompile demo" in done.stdout


def test_shipped_texts_are_the_two_halves():
    calib, heldout = cli.CALIB_TEXT.read_bytes(), cli.EVAL_TEXT.read_bytes()
    assert calib.startswith(b" = No. 20 Squadron RAAF = ")
    assert heldout.startswith(b" = Robert Boulter = ")
    assert abs(len(calib) - len(heldout)) < 0.05 * len(calib)
    calib.decode("utf-8"), heldout.decode("utf-8")


def test_bench_decode_fraction_counts_decode_steps_only(tmp_path, monkeypatch):
    """The decode benchmark's active fraction leaves the prompt's prefill out: under "topk" every
    token keeps exactly round(tau * E) experts, and the steps counted are the decode steps."""
    from ppcompile import bench
    from ppcompile.ffn import REGISTRY
    monkeypatch.setenv("PPCOMPILE_CACHE_DIR", str(tmp_path))
    model = tiny_model("llama")
    forward = model.forward
    calibration = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    model.forward = torch.compile(forward, backend="prunepath", options=dict(
        tau=0.5, method="topk", expert_size=8, calibration=calibration, distill_epochs=0))
    decoder = bench.Decoder(model, prompt_len=12, new_tokens=8)
    prompt = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    fraction = bench.decode_fraction(decoder, prompt, steps=3)
    states = REGISTRY.states_of(model.parameters())
    assert len(states) == 2
    # the last generate() was 1 + 3 new tokens: prefill (2 x 12 tokens) then 3 steps of 2 tokens
    assert [s.stats[1].item() for s in states] == [2 * 12 + 2 * 3] * 2
    assert fraction == pytest.approx(round(0.5 * 8) / 8)
    model.forward = forward


def test_bench_decoder_caches_models_without_grouped_query_attention():
    """GPT-2 has no num_key_value_heads; the cache also holds the benchmark's own longer runs
    (gpu_step_ms's 1 + 32 tokens) whatever --new-tokens is."""
    from ppcompile import bench
    decoder = bench.Decoder(tiny_model("gpt2"), prompt_len=4, new_tokens=8)
    prompt = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    assert decoder.generate(prompt, 8).shape == (1, 12)
    assert decoder.generate(prompt, 1 + 32).shape == (1, 37)
    with pytest.raises(ValueError, match="new_tokens must be >= 2"):
        bench.Decoder(tiny_model("gpt2"), prompt_len=4, new_tokens=1)


@pytest.mark.parametrize("argv, words", [
    (["bench", "--model", "llama3-1b", "--new-tokens", "1"], ["--new-tokens", ">= 2", "'1'"]),
    (["bench", "--model", "llama3-1b", "--prompt-len", "1"], ["--prompt-len", ">= 2", "'1'"]),
    (["demo", "--taus", "0.9", "1.5"], ["--taus", "(0, 1]", "'1.5'"]),
])
def test_cli_refuses_bad_numbers_naming_the_flag(argv, words, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


def test_plan_cache_dir_expands_home_and_ignores_an_empty_value(monkeypatch):
    from ppcompile import plan
    monkeypatch.setenv("PPCOMPILE_CACHE_DIR", "~/pp_plans")
    assert plan.cache_dir() == Path.home() / "pp_plans"
    monkeypatch.setenv("PPCOMPILE_CACHE_DIR", "")
    assert plan.cache_dir() == Path.home() / ".cache" / "ppcompile" / "plans"


def test_perplexity_reads_a_dict_output_and_refuses_one_token_windows():
    class DictLM(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            return {"logits": torch.zeros(*input_ids.shape, 10)}

    windows = torch.randint(0, 10, (4, 8), generator=torch.Generator().manual_seed(0))
    assert evaluate.perplexity(DictLM(), windows, 2) == pytest.approx(10.0)  # uniform over 10
    with pytest.raises(ValueError, match="windows of 1 token.*length >= 2"):
        evaluate.perplexity(DictLM(), windows[:, :1], 2)
