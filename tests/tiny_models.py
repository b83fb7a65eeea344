"""Tiny random Hugging Face models of every family we support, built offline (no hub)."""
import torch
import transformers as T

VOCAB = 128

# family -> (config class, model class, config kwargs, expected FFN kind)
FAMILIES = {
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64), "gelu_tanh"),
    "bert": (T.BertConfig, T.BertModel, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64), "gelu"),
    "roberta": (T.RobertaConfig, T.RobertaModel, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=72), "gelu"),
    "opt": (T.OPTConfig, T.OPTForCausalLM, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32), "relu"),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64), "gelu"),
    "gptj": (T.GPTJConfig, T.GPTJForCausalLM, dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64), "gelu_tanh"),
    "falcon": (T.FalconConfig, T.FalconForCausalLM, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bias=True), "gelu"),
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), "swiglu"),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), "swiglu"),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), "swiglu"),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8), "geglu"),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0), "swiglu"),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8), "swiglu"),
    "gemma3_text": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8), "geglu"),
    "phi": (T.PhiConfig, T.PhiForCausalLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4), "gelu_tanh"),
    "bloom": (T.BloomConfig, T.BloomForCausalLM, dict(hidden_size=32, n_layer=2, n_head=4), "gelu_tanh"),
    "distilbert": (T.DistilBertConfig, T.DistilBertModel, dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64), "gelu"),
    "t5": (T.T5Config, T.T5EncoderModel, dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4), "relu"),
    "t5_gated": (T.T5Config, T.T5EncoderModel, dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"), "geglu"),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8), "geglu"),
    "starcoder2": (T.Starcoder2Config, T.Starcoder2ForCausalLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), "gelu_tanh"),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4), "swiglu"),
    "stablelm": (T.StableLmConfig, T.StableLmForCausalLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), "swiglu"),
    "gpt_bigcode": (T.GPTBigCodeConfig, T.GPTBigCodeForCausalLM, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64), "gelu_tanh"),
    "codegen": (T.CodeGenConfig, T.CodeGenForCausalLM, dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64), "gelu_tanh"),
    "electra": (T.ElectraConfig, T.ElectraModel, dict(hidden_size=32, embedding_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64), "gelu"),
}


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, kwargs, _ = FAMILIES[family]
    config = config_cls(vocab_size=VOCAB, **{**kwargs, **overrides})
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(config, name, None) is not None and getattr(config, name) >= VOCAB:
            setattr(config, name, 1)
    torch.manual_seed(seed)
    return model_cls(config).eval()
