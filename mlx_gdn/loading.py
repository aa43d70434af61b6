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


def _special_tokens(path):
    """{"eos_token": str, "bos_token": str} from tokenizer_config.json / special_tokens_map.json."""
    tokens = {}
    for key in ("eos_token", "bos_token"):
        token = None
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if token is None and (path / name).is_file():
                token = _read_json(path / name).get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token:
            tokens[key] = token
    return tokens


def _read_json(file):
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err.msg}, line {err.lineno})") from None


def _chat_template(path):
    file = path / "tokenizer_config.json"
    template = _read_json(file).get("chat_template") if file.is_file() else None
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def load_tokenizer(path):
    """HF tokenizer.json (tokenizers) if present, else sentencepiece tokenizer.model, else None;
    wrapped in mlx_gdn.generate.Tokenizer."""
    from .generate import Tokenizer
    path = Path(path)
    special, template = _special_tokens(path), _chat_template(path)
    if (path / "tokenizer.json").is_file():
        import tokenizers
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        eos, bos = (backend.token_to_id(special[k]) if k in special else None
                    for k in ("eos_token", "bos_token"))
        return Tokenizer(backend, eos_token_id=eos, bos_token_id=bos, chat_template=template,
                         special_tokens=special)
    if (path / "tokenizer.model").is_file():
        import sentencepiece
        backend = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        special = {"bos_token": backend.IdToPiece(backend.bos_id()) if backend.bos_id() >= 0 else "",
                   "eos_token": backend.IdToPiece(backend.eos_id()) if backend.eos_id() >= 0 else "",
                   **special}
        return Tokenizer(backend, chat_template=template, special_tokens=special)
    return None


def load(path_or_repo):
    """Returns (model, tokenizer or None)."""
    path = resolve(path_or_repo)
    return load_model(path), load_tokenizer(path)
