"""Tokenizer over the `tokenizers` library, and the model's own chat template.

The template is the jinja2 text from tokenizer_config.json (or chat_template.jinja) rendered in
jinja2's ImmutableSandboxedEnvironment with the options transformers uses (trim_blocks,
lstrip_blocks, `raise_exception`, `strftime_now`), so a template renders the same text here as
in transformers and can neither touch files nor run code.

Generation stops at `eos_token_ids`: the eos_token, generation_config.json's eos_token_id, and the
special token the chat template closes an assistant turn with (<|eot_id|> for Llama 3, whose base
tokenizer's eos is <|end_of_text|>): SFT and DPO train the model to emit it, so it ends a reply.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from srlm_engine.io import read_json


class TokenizerError(ValueError):
    pass


def _token_text(tok) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    return tok.get("content")  # an AddedToken serialized as a dict


def _raise(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict, chat_template: str | None,
                 generation_eos: list[int] | None = None):
        self.tok = tok
        self.config = config
        self.chat_template = chat_template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.special_tokens = sorted(t.content for t in tok.get_added_tokens_decoder().values() if t.special)
        eos = set(generation_eos or [])
        if self.eos_token is not None and tok.token_to_id(self.eos_token) is not None:
            eos.add(tok.token_to_id(self.eos_token))
        self._templates: dict[str, object] = {}  # template text -> compiled template
        self.end_of_turn_id = self._end_of_turn()
        self.eos_token_ids = sorted(eos | ({self.end_of_turn_id} - {None}))

    def _end_of_turn(self) -> int | None:
        """The special token right after an assistant reply in the template's rendering, or None."""
        reply = "srlm-reply-7f3a"
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
        for head in ([], [{"role": "system", "content": "You are a helpful assistant."}]):
            try:  # some templates require a system turn first
                text = self.apply_chat_template(head + turns, add_generation_prompt=False)
                break
            except Exception:  # no template, or one that refuses this conversation
                continue
        else:
            return None
        i = text.find(reply)
        ids = self.encode(text[i + len(reply):].lstrip(), add_special_tokens=False) if i >= 0 else []
        return ids[0] if ids and self.tok.id_to_token(ids[0]) in self.special_tokens else None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        f = path / "tokenizer.json"
        if not f.is_file():
            raise TokenizerError(f"{f}: tokenizer file not found")
        try:
            tok = HFTokenizer.from_file(str(f))
        except Exception as e:  # the Rust library's errors carry no file name
            raise TokenizerError(f"{f}: cannot read tokenizer: {e}") from None
        cfg_file = path / "tokenizer_config.json"
        config = read_json(cfg_file) if cfg_file.is_file() else {}
        if not isinstance(config, dict):
            raise TokenizerError(f"{cfg_file}: expected a JSON object")
        for key in ("bos_token", "eos_token", "pad_token"):
            t = config.get(key)
            if not (t is None or isinstance(t, str) or (isinstance(t, dict) and isinstance(t.get("content"), str))):
                raise TokenizerError(f"{cfg_file}: {key} must be a token string, got {t!r}")
        template, source = config.get("chat_template"), cfg_file
        bad_template = TokenizerError(f"{cfg_file}: chat_template must be a string or a list of "
                                      f'{{"name", "template"}}, got {template!r}')
        if isinstance(template, list):  # named templates: take the default one
            if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in template):
                raise bad_template
            template = next((t.get("template") for t in template if t["name"] == "default"), None)
        if template is not None and not isinstance(template, str):
            raise bad_template
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            try:
                template, source = jinja_file.read_text(encoding="utf-8"), jinja_file
            except UnicodeDecodeError as e:
                raise TokenizerError(f"{jinja_file}: invalid UTF-8 at byte {e.start}") from None
        gen_eos = None
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            gen = read_json(gen_file)
            if not isinstance(gen, dict):
                raise TokenizerError(f"{gen_file}: expected a JSON object")
            e = gen.get("eos_token_id")
            gen_eos = [] if e is None else [e] if isinstance(e, int) else e
            if not (isinstance(gen_eos, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                      and 0 <= i < tok.get_vocab_size() for i in gen_eos)):
                raise TokenizerError(f"{gen_file}: eos_token_id must be a token id or a list of them, got {e!r}")
        eos = _token_text(config.get("eos_token"))
        if eos is not None and tok.token_to_id(eos) is None and not gen_eos:
            raise TokenizerError(f"{cfg_file}: eos_token {eos!r} is not a token of {f.name}, and no "
                                 f"generation_config.json names an eos_token_id: generation would never stop")
        tokenizer = cls(tok, config, template, gen_eos)
        if template is not None:
            try:  # compiled here, where the file is known, not at the first render
                tokenizer._compile()
            except TemplateSyntaxError as e:
                raise TokenizerError(f"{source}: chat_template line {e.lineno}: {e.message}") from None
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _compile(self, source: str | None = None):
        """The compiled template of `source` (default: the model's), compiled once per text."""
        source = self.chat_template if source is None else source
        if source not in self._templates:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._templates[source] = env.from_string(source)
        return self._templates[source]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the model's chat template, or with
        `chat_template` (jinja text, in the same sandbox) when given."""
        if chat_template is not None:
            if not isinstance(chat_template, str):
                raise TokenizerError(f"chat_template must be a jinja template string, "
                                     f"got {type(chat_template).__name__}")
            try:
                template = self._compile(chat_template)
            except TemplateSyntaxError as e:
                raise TokenizerError(f"chat_template line {e.lineno}: {e.message}") from None
        elif self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat_template (tokenizer_config.json or "
                                 "chat_template.jinja)")
        else:
            template = self._compile()
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
