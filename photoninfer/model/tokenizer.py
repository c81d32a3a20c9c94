"""Tokenizer: a thin wrapper over a HF fast tokenizer loaded from local files only (HF dir or .gguf).

transformers is used here for tokenization and chat templates only; the model never runs through it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

from photoninfer.config import cache_dir
from photoninfer.errors import ConfigError, ModelLoadError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class Tokenizer:
    """Text <-> token ids, plus the model's own chat template. `.hf` is the wrapped HF tokenizer."""

    def __init__(self, hf, path: str = ""):
        self.hf = hf
        self.path = path

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's jinja template into the prompt text (not yet tokenized)."""
        if not self.hf.chat_template:
            raise ConfigError(
                f"the tokenizer at {self.path or '(unknown path)'} has no chat template, so chat messages cannot be "
                "formatted; use a plain-text prompt (generate / completions) or an instruction-tuned model"
            )
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered conversation. The template already writes the special tokens (BOS
        included), so the tokenizer must not add them again: Llama-3 would otherwise see two BOS."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        # len() counts added tokens too (e.g. chat markers), i.e. every id encode() can return.
        return len(self.hf)

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str) -> Tokenizer:
    """Load the tokenizer of an HF model directory or of a .gguf file, from local files only."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"tokenizer path {path} does not exist (expected an HF directory or a .gguf file)")
    try:
        if os.path.isdir(path):
            if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
                raise ModelLoadError(f"{path} has no tokenizer ({' or '.join(_TOKENIZER_FILES)} is missing)")
            # local_files_only: never reach for the hub, even for a missing optional file.
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        elif path.endswith(".gguf"):
            hf = _load_gguf_tokenizer(path)
        else:
            raise ModelLoadError(f"tokenizer path {path} is a file but not a .gguf; pass an HF directory or a .gguf")
    except ModelLoadError:
        raise
    except Exception as e:  # transformers raises OSError/ValueError/KeyError variants for unreadable tokenizers
        raise ModelLoadError(f"could not load a tokenizer from {path}: {e}") from e
    return Tokenizer(hf, path)


def _tokenizer_cache_dir(path: str) -> str:
    """Where the HF form of a GGUF's tokenizer is kept, keyed by the file's path, size and mtime and by the
    transformers version that converted it."""
    import transformers

    stat = os.stat(path)
    identity = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir("tokenizers", key)


def _load_gguf_tokenizer(path: str):
    """Converting a GGUF vocabulary takes seconds (the metadata holds ~100k strings), so the converted
    tokenizer is saved once and loaded from its tokenizer.json afterwards."""
    from transformers import AutoTokenizer

    cache = _tokenizer_cache_dir(path)
    if os.path.isfile(os.path.join(cache, "tokenizer.json")):
        try:
            return AutoTokenizer.from_pretrained(cache, local_files_only=True)
        except Exception:  # a damaged cache entry is rebuilt below
            pass
    hf = AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), local_files_only=True
    )
    if not hf.chat_template:
        hf.chat_template = _gguf_chat_template(path)
    try:
        tmp = f"{cache}.tmp{os.getpid()}"
        hf.save_pretrained(tmp)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        os.replace(tmp, cache)  # atomic: concurrent loaders never see half a cache entry
    except OSError:
        pass  # a read-only home only costs the conversion next time
    return hf


def _gguf_chat_template(path: str) -> Optional[str]:
    """The `tokenizer.chat_template` metadata string of a GGUF, in case transformers did not attach it."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.chat_template")
    return None if field is None else field.contents()
