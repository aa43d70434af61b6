"""`mlx_gdn.load`: a converted model directory (or a hub id) -> (model, tokenizer)."""

import json
from pathlib import Path

from .models import load_model

MODEL_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer.model",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def resolve(path_or_repo):
    """A local directory as is; anything else is a hub id fetched with huggingface_hub (cached)."""
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_repo).startswith((".", "/")):
        raise FileNotFoundError(f"{path_or_repo}: no such model directory")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(path_or_repo), allow_patterns=MODEL_FILES))
    except Exception as err:
        raise FileNotFoundError(f"{path_or_repo}: not a local directory, and the hub download failed "
                                f"({type(err).__name__}: {err}); offline? set HF_HUB_OFFLINE=1 to use "
                                "the local cache only") from None


def _special_ids(path, backend):
    """(eos, bos) ids of a tokenizers.Tokenizer from tokenizer_config.json / special_tokens_map.json."""
    ids = []
    for key in ("eos_token", "bos_token"):
        token = None
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if token is None and (path / name).is_file():
                token = json.loads((path / name).read_text()).get(key)
        token = token.get("content") if isinstance(token, dict) else token
        ids.append(backend.token_to_id(token) if token else None)
    return ids


def load_tokenizer(path):
    """HF tokenizer.json (tokenizers) if present, else sentencepiece tokenizer.model, else None;
    wrapped in mlx_gdn.generate.Tokenizer."""
    from .generate import Tokenizer
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        import tokenizers
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        eos, bos = _special_ids(path, backend)
        return Tokenizer(backend, eos_token_id=eos, bos_token_id=bos)
    if (path / "tokenizer.model").is_file():
        import sentencepiece
        return Tokenizer(sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model")))
    return None


def load(path_or_repo):
    """Returns (model, tokenizer or None)."""
    path = resolve(path_or_repo)
    return load_model(path), load_tokenizer(path)
