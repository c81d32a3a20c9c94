"""Tokenizer: GGUF and HF-directory loading, UTF-8 round trips, the ChatML template, errors."""

from __future__ import annotations

import json
import re
import os
import shutil

import pytest

from photoninfer.errors import ConfigError, ModelLoadError
from photoninfer.model.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "Hello, world!",
    "Crème brûlée, naïve café, São Paulo, Ångström",
    "Emoji: 😀👍🏽 👨‍👩‍👧 🇫🇷",
    "中文测试：你好，世界。日本語のテキスト。한국어 문장",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "mixed: αβγ ∑∫ — “quotes” … 🚀 東京",
]


@pytest.fixture(scope="module")
def dir_tokenizer(smol_tokenizer_dir) -> Tokenizer:
    return load_tokenizer(smol_tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(smol_gguf_tokenizer, dir_tokenizer, text):
    ids = smol_gguf_tokenizer.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert smol_gguf_tokenizer.decode(ids) == text
    assert dir_tokenizer.encode(text) == ids  # the saved directory tokenizes exactly like the GGUF
    assert dir_tokenizer.decode(ids) == text


def test_special_ids_and_vocab(smol_gguf_tokenizer, dir_tokenizer):
    for tok in (smol_gguf_tokenizer, dir_tokenizer):
        assert isinstance(tok, Tokenizer)
        assert tok.eos_token_id == tok.hf.convert_tokens_to_ids("<|im_end|>") == 2
        assert tok.bos_token_id == tok.hf.convert_tokens_to_ids("<|im_start|>") == 1
        assert tok.vocab_size == 49152


def test_special_tokens_encode_and_skip_on_decode(smol_gguf_tokenizer):
    tok = smol_gguf_tokenizer
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2  # markers are single special tokens, not split into characters
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode(ids) == "user\nhi"


def test_chat_template_gguf(smol_gguf_tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = smol_gguf_tokenizer.apply_chat_template(messages)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")  # SmolLM2's template adds a default system prompt

    without = smol_gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert not without.endswith("<|im_start|>assistant\n") and prompt.startswith(without)


def test_chat_template_survives_save_pretrained(smol_gguf_tokenizer, dir_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert dir_tokenizer.apply_chat_template(messages) == smol_gguf_tokenizer.apply_chat_template(messages)


def test_no_chat_template_is_a_clear_error(smol_tokenizer_dir, tmp_path):
    plain = shutil.copytree(smol_tokenizer_dir, tmp_path / "plain")
    if (plain / "chat_template.jinja").exists():
        (plain / "chat_template.jinja").unlink()
    config_path = plain / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))

    tok = load_tokenizer(str(plain))
    assert tok.encode("hi") == load_tokenizer(smol_tokenizer_dir).encode("hi")
    with pytest.raises(ConfigError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_error_nonexistent_path(tmp_path):
    with pytest.raises(ModelLoadError, match="missing_tok.*does not exist"):
        load_tokenizer(str(tmp_path / "missing_tok"))


def test_error_dir_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        load_tokenizer(str(tmp_path))


def test_error_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("a\nb\n")
    with pytest.raises(ModelLoadError, match=r"vocab\.txt"):
        load_tokenizer(str(path))


def test_error_broken_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path))):
        load_tokenizer(str(tmp_path))


def test_chat_ids_carry_the_templates_special_tokens_once(smol_tokenizer_dir, tmp_path):
    """A tokenizer that adds BOS itself (like Llama-3's) must not add it again to a rendered chat."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    bos = hf.convert_tokens_to_ids("<|im_start|>")  # the token SmolLM2's template starts with
    hf.backend_tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    hf.save_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("hi")[0] == bos  # the tokenizer does add it to plain text
    messages = [{"role": "user", "content": "hi"}]
    ids = tok.encode_chat(messages)
    assert ids[0] == bos and ids[1] != bos
    assert ids == list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_gguf_tokenizer_is_converted_once_then_loaded_from_the_cache(default_gguf_path, tmp_path, monkeypatch):
    monkeypatch.setenv("PHOTONINFER_CACHE", str(tmp_path))
    fresh = load_tokenizer(default_gguf_path)
    cached_files = list(tmp_path.glob("tokenizers/*/tokenizer.json"))
    assert len(cached_files) == 1
    again = load_tokenizer(default_gguf_path)
    text = "Cached 🚀 tokenizer — 日本語"
    assert again.encode(text) == fresh.encode(text)
    messages = [{"role": "user", "content": text}]
    assert again.apply_chat_template(messages) == fresh.apply_chat_template(messages)
    assert again.eos_token_id == fresh.eos_token_id


# ---- the cached GGUF tokenizer, run without transformers ---------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋 <|im_end|>"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "日本語で\n\n  spaces  "}],
    [{"role": "user", "content": "a", "name": None}],  # None values are dropped, as transformers does
]


@pytest.fixture(scope="module")
def cached_and_converted(default_gguf_path, tmp_path_factory):
    """(CachedTokenizer from a fresh cache entry, the transformers tokenizer that wrote it)."""
    from photoninfer.model.tokenizer import CachedTokenizer

    old = os.environ.get("PHOTONINFER_CACHE")
    os.environ["PHOTONINFER_CACHE"] = str(tmp_path_factory.mktemp("tokcache"))
    try:
        converted = load_tokenizer(default_gguf_path)
        cached = load_tokenizer(default_gguf_path)
    finally:
        os.environ.pop("PHOTONINFER_CACHE") if old is None else os.environ.__setitem__("PHOTONINFER_CACHE", old)
    assert type(converted) is Tokenizer and isinstance(cached, CachedTokenizer)
    return cached, converted


@pytest.mark.parametrize("special", [True, False])
def test_cached_tokenizer_encodes_and_decodes_like_transformers(cached_and_converted, special):
    cached, converted = cached_and_converted
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>", "", " <|endoftext|>x"]:
        ids = converted.encode(text, add_special_tokens=special)
        assert cached.encode(text, add_special_tokens=special) == ids
        for skip in (True, False):
            assert cached.decode(ids, skip_special_tokens=skip) == converted.hf.decode(ids, skip_special_tokens=skip)
    assert (cached.eos_token_id, cached.bos_token_id, cached.vocab_size) == \
        (converted.eos_token_id, converted.bos_token_id, converted.vocab_size)
    assert cached.clean_up_tokenization_spaces is False and cached.backend_tokenizer is not None


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_cached_tokenizer_renders_the_chat_template_like_transformers(cached_and_converted, messages,
                                                                      add_generation_prompt):
    cached, converted = cached_and_converted
    expected = converted.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert cached.apply_chat_template(messages, add_generation_prompt) == expected
    assert cached.encode_chat(messages, add_generation_prompt) == converted.encode_chat(messages, add_generation_prompt)


def test_chat_template_environment_matches_transformers(cached_and_converted):
    """The helpers and options transformers gives templates: tojson keeps non-ASCII, raise_exception, loop
    controls, trim/lstrip of blocks, the special tokens as variables, a {% generation %} block."""
    from photoninfer.model.chat_template import render_chat_template

    _, converted = cached_and_converted
    template = (
        "{{ bos_token }}{% for m in messages %}\n"
        "  {% if m.role == 'skip' %}{% continue %}{% endif %}\n"
        "  {% if m.role == 'bad' %}{{ raise_exception('role bad is not allowed') }}{% endif %}\n"
        "{% generation %}{{ m | tojson }}{% endgeneration %}|{{ m.reasoning_content }}\n"
        "{% endfor %}{% if add_generation_prompt %}GO{% endif %}{{ eos_token }}"
    )
    messages = [{"role": "user", "content": "héllo 🚀"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": "ok", "thinking": "hm"}]
    expected = converted.hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=True)
    got = render_chat_template(template, messages, True, dict(converted.hf.special_tokens_map))
    assert got == expected and "héllo 🚀" in got
    with pytest.raises(Exception, match="role bad is not allowed"):
        render_chat_template(template, [{"role": "bad", "content": ""}], True, {})


def test_cached_tokenizer_needs_no_transformers(default_gguf_path, smol_gguf_tokenizer):
    """A warm start loads, renders and decodes without importing transformers (1.5 s of a start)."""
    import subprocess
    import sys

    code = (
        "import sys; from photoninfer.model.tokenizer import load_tokenizer, CachedTokenizer\n"
        f"tok = load_tokenizer({default_gguf_path!r})\n"
        "ids = tok.encode_chat([{'role': 'user', 'content': 'hi'}])\n"
        "assert isinstance(tok, CachedTokenizer) and tok.decode(ids)\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_tokenizer_cache_key_follows_the_file_and_the_library_versions(tmp_path, monkeypatch):
    import importlib.metadata

    from photoninfer.model.tokenizer import _tokenizer_cache_dir

    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    first = _tokenizer_cache_dir(str(path))
    assert _tokenizer_cache_dir(str(path)) == first
    os.utime(path, ns=(1, 1))
    second = _tokenizer_cache_dir(str(path))
    assert second != first
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == "tokenizers" else real(name))
    assert _tokenizer_cache_dir(str(path)) != second


@pytest.mark.parametrize("damage", ["spec", "tokenizer.json", "no spec"])
def test_damaged_tokenizer_cache_entry_is_rebuilt(default_gguf_path, tmp_path, monkeypatch, damage):
    from photoninfer.model.tokenizer import _SPEC_FILE, CachedTokenizer, _tokenizer_cache_dir

    monkeypatch.setenv("PHOTONINFER_CACHE", str(tmp_path))
    good = load_tokenizer(default_gguf_path)
    entry = _tokenizer_cache_dir(default_gguf_path)
    if damage == "no spec":
        os.remove(os.path.join(entry, _SPEC_FILE))
    else:
        with open(os.path.join(entry, _SPEC_FILE if damage == "spec" else damage), "w") as f:
            f.write("{broken")
    rebuilt = load_tokenizer(default_gguf_path)  # converted again, with a warning
    assert type(rebuilt) is Tokenizer and rebuilt.encode("Hello, world!") == good.encode("Hello, world!")
    assert isinstance(load_tokenizer(default_gguf_path), CachedTokenizer)  # the entry was repaired
