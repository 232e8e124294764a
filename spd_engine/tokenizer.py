"""Tokenizer and chat template from a Hugging Face model directory (``tokenizers`` + jinja2, no transformers)."""
from __future__ import annotations

import json
from pathlib import Path

import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .errors import UserError


def _token_text(value, key: str, config_path: Path) -> str | None:
    """tokenizer_config stores special tokens either as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise UserError(f"'{config_path}': '{key}' must be a token string, got {value!r}")
    return value


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"no tokenizer.json in '{model_dir}'")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - `tokenizers` reports every parse failure as a bare Exception
            raise UserError(f"'{path}' is not a valid tokenizer.json: {exc}") from exc
        config_path = model_dir / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        except ValueError as exc:  # bad JSON or bad UTF-8
            raise UserError(f"'{config_path}' is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise UserError(f"'{config_path}' must hold a JSON object")
        template_file = model_dir / "chat_template.jinja"  # transformers >= 4.43 may store it apart
        self.chat_template = config.get("chat_template") or (
            template_file.read_text() if template_file.is_file() else None)
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise UserError(f"'{config_path}': 'chat_template' must be a string")  # lists of named templates too
        self.bos_token = _token_text(config.get("bos_token"), "bos_token", config_path)
        self.eos_token = _token_text(config.get("eos_token"), "eos_token", config_path)
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def vocabulary(self) -> dict[str, int]:
        """Every token string (added tokens included) and its id: two tokenizers that agree here give every token
        the same id."""
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def max_token_id(self) -> int:
        return max(self.vocabulary().values(), default=-1)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Special-token strings in ``text`` become their ids; BOS only if the tokenizer settings ask."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise UserError("this model has no chat template; run without --chat")

        def raise_exception(message):
            raise UserError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as exc:
            raise UserError(f"the model's chat template does not render: {exc}") from exc

    def encode_chat(self, user_text: str) -> list[int]:
        """One user turn under the model's chat template; the template itself decides about BOS."""
        return self.encode(self.apply_chat_template([{"role": "user", "content": user_text}]), add_bos=False)


class StreamDecoder:
    """Turns a growing id list into display text increments (special tokens such as <|im_end|> left out),
    holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self._emitted = text[self._emitted:], len(text)
        return delta
