"""Text generation: prefill through the chunked path, then one token at a time with the decode caches.

Sampling (temperature, top-p, top-k, min-p) and the repetition penalty are mlx-lm's
(`mlx_lm.sample_utils`); `stream_generate` yields text as it is produced, `generate` returns it all.
"""

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler


# A small GDN trained by scripts/make_default_model.py on Python's documentation (PSF License 2.0)
DEFAULT_MODEL = Path(__file__).parent / "default_model"


class Tokenizer:
    """One interface over sentencepiece (`tokenizer.model`) and HF `tokenizers` (`tokenizer.json`),
    with the chat template of tokenizer_config.json when the model has one."""

    def __init__(self, backend, eos_token_id=None, bos_token_id=None, chat_template=None,
                 special_tokens=None):
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}  # bos_token / eos_token strings for templates
        self.is_sentencepiece = hasattr(backend, "IdToPiece")
        if self.is_sentencepiece:
            eos_token_id = backend.eos_id() if eos_token_id is None else eos_token_id
            bos_token_id = backend.bos_id() if bos_token_id is None else bos_token_id
        self.eos_token_id = eos_token_id if eos_token_id is not None and eos_token_id >= 0 else None
        self.bos_token_id = bos_token_id if bos_token_id is not None and bos_token_id >= 0 else None

    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        ids = self._encode_sentencepiece(text) if self.is_sentencepiece else self.backend.encode(text).ids
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + list(ids)
        return list(ids)

    def _encode_sentencepiece(self, text):
        # sentencepiece reads "</s>" in text as characters: the BOS / EOS strings a chat template
        # writes become their ids here (HF tokenizers does this itself for its added tokens)
        specials = {self.special_tokens.get(name): i for name, i in
                    (("bos_token", self.bos_token_id), ("eos_token", self.eos_token_id))
                    if self.special_tokens.get(name) and i is not None}
        if not any(s in text for s in specials):
            return self.backend.encode(text)
        ids = []
        for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
            if part in specials:
                ids.append(specials[part])
            elif part:
                ids += self.backend.encode(part)
        return ids

    def decode(self, ids: List[int]) -> str:
        ids = [i for i in ids if i not in (self.bos_token_id, self.eos_token_id)]
        return self.backend.decode(ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        """The conversation rendered as transformers does: the jinja template in a sandbox, with
        bos_token / eos_token and raise_exception."""
        if not self.chat_template:
            raise ValueError("the model has no chat template (tokenizer_config.json 'chat_template')")
        from jinja2.exceptions import TemplateError
        try:
            return self._compiled_template().render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except TemplateError as err:
            raise ValueError(f"chat template: {err}") from None

    def _compiled_template(self):
        # compiled once: a training set renders it several times per conversation
        if getattr(self, "_template", None) is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template

    def encode_chat(self, messages, add_generation_prompt: bool = False):
        """(ids, assistant) for a conversation: assistant[i] is True where token i belongs to an
        assistant turn (the tokens that turn's template adds after the generation prompt)."""
        ids = self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=True)
        assistant = [False] * len(ids)
        for i, message in enumerate(messages):
            if message.get("role") == "assistant":
                start = len(self.encode(self.apply_chat_template(messages[:i], True)))
                end = len(self.encode(self.apply_chat_template(messages[:i + 1])))
                assistant[start:end] = [True] * (min(end, len(ids)) - start)
        return ids, assistant


@dataclass
class Response:
    text: str  # the new text since the previous response
    token: Optional[int]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None  # "stop" (EOS or a stop string) or "length"


def generate_tokens(model, prompt: mx.array, max_tokens: int, sampler=None, logits_processors=(),
                    mask=None):
    """prompt [B, T] token ids -> yields next tokens [B] (prefill once, then single-token steps)."""
    sampler = sampler or make_sampler()
    cache = model.make_cache()
    tokens = prompt
    logits = model(prompt, mask=mask, cache=cache)[:, -1]
    for _ in range(max_tokens):
        for processor in logits_processors:
            logits = processor(tokens, logits)
        token = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        mx.eval(token)
        yield token
        tokens = mx.concatenate([tokens, token[:, None]], axis=1)
        logits = model(token[:, None], cache=cache)[:, -1]


def chat_prompt(tokenizer: Tokenizer, prompt: str, system: Optional[str] = None,
                use_template: bool = True) -> str:
    """The prompt as the model's chat template renders a user turn (after an optional system turn),
    ready for the assistant's answer; the plain prompt when the model has no template or
    use_template is False (then a system prompt is an error: there is nowhere to put it)."""
    if use_template and tokenizer.chat_template:
        messages = ([{"role": "system", "content": system}] if system else [])
        return tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}],
                                             add_generation_prompt=True)
    if system:
        raise ValueError("a system prompt needs the model's chat template (the model has none, or "
                         "--no-chat-template was given)")
    return prompt


def context_limit(model, max_context: Optional[int] = None) -> Optional[int]:
    """The longest prompt + generation: max_context if given, else the config's
    max_position_embeddings (the length it was trained for), else none."""
    return max_context if max_context is not None else model.args.extra.get("max_position_embeddings")


def _check_request(model, n_prompt, max_tokens, max_context):
    if n_prompt == 0:
        raise ValueError("generate: the prompt is empty")
    if max_tokens < 1:
        raise ValueError(f"generate: max_tokens must be at least 1, got {max_tokens}")
    limit = context_limit(model, max_context)
    if limit is not None and n_prompt + max_tokens > limit:
        raise ValueError(f"generate: the prompt has {n_prompt} tokens; with max_tokens {max_tokens} that "
                         f"is more than the model's {limit} (max_position_embeddings; a larger "
                         "--max-context runs it anyway)")


def stream_generate(model, tokenizer: Tokenizer, prompt: str, max_tokens: int = 256, temp: float = 0.0,
                    top_p: float = 0.0, top_k: int = 0, min_p: float = 0.0,
                    repetition_penalty: Optional[float] = None, stop: tuple = (),
                    max_context: Optional[int] = None) -> Iterator[Response]:
    ids = tokenizer.encode(prompt) if prompt else []
    _check_request(model, len(ids), max_tokens, max_context)
    sampler = make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(repetition_penalty=repetition_penalty)
    mx.reset_peak_memory()
    start = time.perf_counter()
    generated, text, emitted, prompt_tps = [], "", 0, 0.0
    hold = max((len(x) for x in stop), default=1) - 1  # text that may still become a stop string
    steps = generate_tokens(model, mx.array([ids]), max_tokens, sampler, processors)
    for n, token in enumerate(steps, start=1):
        if n == 1:
            prompt_tps = len(ids) / (time.perf_counter() - start)
            start = time.perf_counter()
        token = token.item()
        finish, end = None, None
        if token == tokenizer.eos_token_id:
            finish = "stop"
        else:
            generated.append(token)
            text = tokenizer.decode(generated)
            hits = [text.find(x, max(0, emitted - hold)) for x in stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                finish, end = "stop", min(hits)
        if finish is None and n == max_tokens:
            finish = "length"
        if end is None:
            end = len(text) if finish else max(emitted, len(text) - hold)
        piece, emitted = text[emitted:end], max(emitted, end)
        elapsed = max(time.perf_counter() - start, 1e-9)
        yield Response(piece, token, len(ids), prompt_tps, n, n / elapsed,
                       mx.get_peak_memory() / 1e9, finish)
        if finish:
            return


def generate(model, tokenizer: Tokenizer, prompt: str, **kwargs) -> str:
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


def generate_batch(model, tokenizer: Tokenizer, prompts: List[str], max_tokens: int = 256,
                   temp: float = 0.0, top_p: float = 0.0, top_k: int = 0, min_p: float = 0.0,
                   max_context: Optional[int] = None) -> List[str]:
    """All prompts at once, left-padded (each row's text stops at its EOS)."""
    encoded = [tokenizer.encode(p) if p else [] for p in prompts]
    if not encoded:
        raise ValueError("generate: no prompts")
    for ids in encoded:
        _check_request(model, len(ids), max_tokens, max_context)
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.eos_token_id or 0
    tokens = mx.array([[pad] * (width - len(ids)) + ids for ids in encoded])
    mask = mx.array([[False] * (width - len(ids)) + [True] * len(ids) for ids in encoded])
    sampler = make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    outputs, done = [[] for _ in prompts], [False] * len(prompts)
    for step in generate_tokens(model, tokens, max_tokens, sampler, mask=mask):
        for row, token in enumerate(step.tolist()):
            done[row] = done[row] or token == tokenizer.eos_token_id
            if not done[row]:
                outputs[row].append(token)
        if all(done):
            break
    return [tokenizer.decode(ids) for ids in outputs]
