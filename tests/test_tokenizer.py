"""Our tokenizer and chat template agree with transformers on the same files."""
import json

import pytest
from jinja2.exceptions import SecurityError, TemplateError
from transformers import PreTrainedTokenizerFast

from srlm_engine.tokenizer import Tokenizer, TokenizerError

TEXTS = [
    "What is the capital of France?",
    "  leading spaces and trailing   ",
    "Numbers: 1234567890, 3.14159, -42, 1e-5 and 2,165,423 residents.",
    "def f(x):\n    return x ** 2  # squares\n\n\ttabbed",
    "Unicode: café, naïve, 東京, Привет, emoji 🤖🚀, ﬁ ligature",
    "<|im_start|>user\nhi<|im_end|>",  # control tokens inside text are special tokens
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]


@pytest.fixture(scope="module")
def pair(smollm2_dir):
    return Tokenizer.from_pretrained(smollm2_dir), PreTrainedTokenizerFast(
        tokenizer_file=str(smollm2_dir / "tokenizer.json"))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(pair, text):
    ours, ref = pair
    for special in (True, False):
        ids = ours.encode(text, add_special_tokens=special)
        assert ids == ref.encode(text, add_special_tokens=special)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_special_tokens(pair):
    ours, _ = pair
    assert len(ours.special_tokens) == 17  # the GGUF's control tokens
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_ids == [ours.token_to_id("<|im_end|>")]
    assert ours.encode("<|im_end|>", add_special_tokens=False) == ours.eos_token_ids
    assert ours.decode(ours.encode("a<|im_end|>b"), skip_special_tokens=True) == "ab"


@pytest.mark.parametrize("template, end", [
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}", "<|endoftext|>"),
    ("{% for m in messages %}{{ m.content }} <|im_end|>{% endfor %}", "<|im_end|>"),
    ("{% for m in messages %}{{ m.content }}\n\n{% endfor %}", None),                  # no closing token
    ("{% if messages[0].role != 'system' %}{{ raise_exception('system message required') }}{% endif %}"
     "{% for m in messages %}{{ m.content }}<|endoftext|>{% endfor %}", "<|endoftext|>"),  # needs a system turn
    ("{{ raise_exception('system message required') }}", None)])                       # refuses to render
def test_generation_stops_at_the_templates_end_of_turn(pair, template, end):
    ours, _ = pair
    t = Tokenizer(ours.tok, ours.config, template)
    want = None if end is None else t.token_to_id(end)
    assert t.end_of_turn_id == want
    assert t.eos_token_ids == sorted({t.token_to_id("<|im_end|>"), want} - {None})


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(smollm2_dir, messages, gen):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(smollm2_dir)
    ours = Tokenizer.from_pretrained(smollm2_dir)
    assert ours.apply_chat_template(messages, add_generation_prompt=gen) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=gen)


def _with_template(tmp_path, smollm2_dir, template):
    for f in ("tokenizer.json",):
        (tmp_path / f).write_bytes((smollm2_dir / f).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return Tokenizer.from_pretrained(tmp_path)


def test_template_is_sandboxed(tmp_path, smollm2_dir):
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(SecurityError):
        _with_template(tmp_path, smollm2_dir, evil).apply_chat_template([{"role": "user", "content": "x"}])
    mutate = "{% set _ = messages.append({'role': 'x'}) %}ok"  # immutable sandbox: no list mutation
    with pytest.raises(SecurityError):
        _with_template(tmp_path, smollm2_dir, mutate).apply_chat_template([{"role": "user", "content": "x"}])


def test_template_raise_exception_and_chat_template_jinja(tmp_path, smollm2_dir):
    tok = _with_template(tmp_path, smollm2_dir, "{{ raise_exception('only user turns') }}")
    with pytest.raises(TemplateError, match="only user turns"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    tok = Tokenizer.from_pretrained(tmp_path)  # the .jinja file wins, as in transformers
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x"


def test_broken_template_named_at_load(tmp_path, smollm2_dir):
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: chat_template line 1: .*'endfor'"):
        _with_template(tmp_path, smollm2_dir, "{% for m in messages %}{{ m.content }}")
    (tmp_path / "chat_template.jinja").write_text("[{{ m.role }]\n")
    with pytest.raises(TokenizerError, match=r"chat_template\.jinja: chat_template line 1: "):
        _with_template(tmp_path, smollm2_dir, "{{ messages }}")


def test_missing_tokenizer_and_template(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: tokenizer file not found"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("name, content, msg", [
    ("tokenizer_config.json", [], r"tokenizer_config\.json: expected a JSON object"),
    ("tokenizer_config.json", {"chat_template": 5}, r"tokenizer_config\.json: chat_template must be a string"),
    ("tokenizer_config.json", {"chat_template": ["{{ x }}"]}, r"tokenizer_config\.json: chat_template must be"),
    ("tokenizer_config.json", {"eos_token": 2}, r"tokenizer_config\.json: eos_token must be a token string, got 2"),
    ("tokenizer_config.json", {"eos_token": "<nope>"}, r"tokenizer_config\.json: eos_token '<nope>' is not a token "
                                                         r"of tokenizer\.json.*would never stop"),
    ("generation_config.json", [2], r"generation_config\.json: expected a JSON object"),
    ("generation_config.json", {"eos_token_id": "2"}, r"generation_config\.json: eos_token_id must be a token id"),
    ("generation_config.json", {"eos_token_id": [2, 2.0]}, r"generation_config\.json: eos_token_id must be"),
    ("generation_config.json", {"eos_token_id": True}, r"generation_config\.json: eos_token_id must be"),
    ("generation_config.json", {"eos_token_id": 10**9}, r"generation_config\.json: eos_token_id must be"),
    ("chat_template.jinja", b"{{ caf\xe9 }}", r"chat_template\.jinja: invalid UTF-8 at byte 6"),
])
def test_malformed_tokenizer_side_files_are_named(tmp_path, smollm2_dir, name, content, msg):
    from srlm_engine.tokenizer import TokenizerError
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((smollm2_dir / f).read_bytes())
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    (tmp_path / name).write_bytes(raw)
    with pytest.raises(TokenizerError, match=msg):
        Tokenizer.from_pretrained(tmp_path)


def test_an_eos_token_outside_the_vocabulary_is_fine_when_generation_config_names_one(tmp_path, smollm2_dir):
    (tmp_path / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == [2]
