"""Measure what sparsity costs: token windows from text, perplexity, embedding similarity.

Every function here works the same on an eager model and on its torch.compile'd version, and
calls the model with one fixed batch shape so that a compiled model never recompiles.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def token_windows(tokenizer, text: str, length: int, max_windows: int | None = None,
                  bos: int | None = None) -> torch.Tensor:
    """LongTensor [n, length]: `text` tokenized once (no special tokens) and cut into consecutive,
    non-overlapping windows; the tail that does not fill a window is dropped. With `bos`, each
    window is `bos` followed by length - 1 text tokens (models such as Gemma expect BOS first)."""
    if length < 2:
        raise ValueError(f"token_windows: length must be >= 2, got {length}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"token_windows: max_windows must be >= 1 or None, got {max_windows}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"],
                       dtype=torch.long)
    step = length if bos is None else length - 1
    n = len(ids) // step
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"token_windows: the text has {len(ids)} tokens, too few for one window "
                         f"of {length} tokens")
    windows = ids[:n * step].view(n, step)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def bos_for(model, tokenizer) -> int | None:
    """The BOS id to start each window with: Gemma models need it (their perplexity is far off
    without), the others we run do not use one."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    if model_type.startswith("gemma"):
        if tokenizer.bos_token_id is None:
            raise ValueError(f"bos_for: {model_type} needs a BOS token but the tokenizer has none")
        return tokenizer.bos_token_id
    return None


def perplexity(model, windows: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token NLL) over all windows, for a causal LM (eager or compiled). Batches are
    exactly `batch_size` windows; the last partial batch is dropped so that the input shape never
    changes (a compiled model would recompile for it)."""
    batches = _batches(windows, batch_size, "perplexity")
    if windows.shape[1] < 2:
        raise ValueError(f"perplexity: windows of {windows.shape[1]} token(s) predict nothing "
                         "(each token is predicted from the ones before it); need length >= 2")
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = _main_output(model(input_ids=batch, use_cache=False), "logits")
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                   reduction="sum").item()
            count += batch[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count, dtype=torch.float64)))


def embedding_cosine(model_a, model_b, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean over windows of the cosine similarity between the two models' sentence embeddings
    (last hidden state mean-pooled over tokens), for encoders such as MiniLM that have no LM head:
    1.0 means the sparse model embeds exactly like the dense one. Same batching as perplexity."""
    cosines = []
    with torch.no_grad():
        for batch in _batches(windows, batch_size, "embedding_cosine"):
            a = _main_output(model_a(input_ids=batch), "last_hidden_state").float().mean(dim=1)
            b = _main_output(model_b(input_ids=batch), "last_hidden_state").float().mean(dim=1)
            cosines.append(F.cosine_similarity(a, b, dim=-1))
    return torch.cat(cosines).mean().item()


def _batches(windows, batch_size, who) -> list:
    if windows.dim() != 2:
        raise ValueError(f"{who}: windows must be [n, length], got shape {tuple(windows.shape)}")
    if batch_size < 1 or len(windows) < batch_size:
        raise ValueError(f"{who}: need at least one full batch: {len(windows)} windows, "
                         f"batch_size {batch_size}")
    full = len(windows) // batch_size * batch_size
    return list(windows[:full].split(batch_size))


def _main_output(output, name):
    """`output.<name>` of a Hugging Face output (or a dict's entry), or the first element of a
    tuple output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    # Hugging Face outputs are mappings too; a plain dict has no attributes
    value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
    if value is None:
        raise ValueError(f"the model's output ({type(output).__name__}) has no '{name}'"
                         + ("; perplexity needs a causal LM (for encoders use embedding_cosine)"
                            if name == "logits" else ""))
    return value
