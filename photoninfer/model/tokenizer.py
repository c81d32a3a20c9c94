"""Tokenizer: text <-> token ids and the model's chat template, loaded from local files only (HF dir or .gguf).

An HF directory is read by transformers (AutoTokenizer). A GGUF's vocabulary is converted by transformers once;
the result is cached, and later starts load it with the Rust `tokenizers` library alone (CachedTokenizer),
which saves the ~1.5 s that importing transformers costs. The model never runs through transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Optional

from photoninfer.config import cache_dir
from photoninfer.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_CACHE_VERSION = 2  # bump when the layout of a cache entry changes
_SPEC_FILE = "photoninfer_tokenizer.json"  # what CachedTokenizer needs besides tokenizer.json


class Tokenizer:
    """Text <-> token ids, plus the model's own chat template, over a transformers tokenizer (`.hf`)."""

    def __init__(self, hf, path: str = ""):
        self._hf = hf
        self.path = path

    @property
    def hf(self):
        """The wrapped transformers tokenizer."""
        return self._hf

    @property
    def backend_tokenizer(self):
        """The Rust `tokenizers.Tokenizer` doing the work, or None for a slow (Python) tokenizer."""
        return getattr(self.hf, "backend_tokenizer", None)

    @property
    def clean_up_tokenization_spaces(self) -> bool:
        """Whether decode rewrites spaces after the Rust decode (the detokenizer then cannot bypass decode)."""
        return bool(getattr(self.hf, "clean_up_tokenization_spaces", False))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self) -> Optional[str]:
        return self.hf.chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's jinja template into the prompt text (not yet tokenized)."""
        if not self.chat_template:
            raise ConfigError(
                f"the tokenizer at {self.path or '(unknown path)'} has no chat template, so chat messages cannot be "
                "formatted; use a plain-text prompt (generate / completions) or an instruction-tuned model"
            )
        return self._render(messages, add_generation_prompt)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
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
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size})"


class CachedTokenizer(Tokenizer):
    """A tokenizer from a cache entry that transformers wrote, run by `tokenizers` alone (no transformers import).

    The entry holds transformers' own tokenizer.json (the Rust tokenizer it encodes and decodes with) and
    _SPEC_FILE: the chat template and the special tokens. Only tokenizers whose transformers decode adds
    nothing to the Rust decode are cached this way. `.hf` still loads the transformers form, on first use.
    """

    def __init__(self, backend, spec: dict, entry: str, path: str = ""):
        super().__init__(None, path)
        self._backend = backend
        self._template: Optional[str] = spec["chat_template"]
        self._special_tokens: dict = spec["special_tokens"]
        self._entry = entry

    @classmethod
    def load(cls, entry: str, path: str = "") -> "CachedTokenizer":
        """Raises (ValueError, OSError, KeyError, Exception of tokenizers) on a missing or damaged entry."""
        from tokenizers import Tokenizer as RustTokenizer

        with open(os.path.join(entry, _SPEC_FILE), encoding="utf-8") as f:
            spec = json.load(f)
        if not isinstance(spec.get("special_tokens"), dict) or "chat_template" not in spec:
            raise ValueError(f"{entry}/{_SPEC_FILE} lacks special_tokens or chat_template")
        return cls(RustTokenizer.from_file(os.path.join(entry, "tokenizer.json")), spec, entry, path)

    @property
    def hf(self):
        if self._hf is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(self._entry, local_files_only=True)
        return self._hf

    @property
    def backend_tokenizer(self):
        return self._backend

    @property
    def clean_up_tokenization_spaces(self) -> bool:
        return False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self) -> Optional[str]:
        return self._template

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from photoninfer.model.chat_template import render_chat_template

        return render_chat_template(self._template, messages, add_generation_prompt, self._special_tokens)

    def _special_id(self, name: str) -> Optional[int]:
        token = self._special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._special_id("eos_token")

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._special_id("bos_token")

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)


def load_tokenizer(path: str) -> Tokenizer:
    """Load the tokenizer of an HF model directory or of a .gguf file, from local files only."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"tokenizer path {path} does not exist (expected an HF directory or a .gguf file)")
    try:
        if os.path.isdir(path):
            if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
                raise ModelLoadError(f"{path} has no tokenizer ({' or '.join(_TOKENIZER_FILES)} is missing)")
            from transformers import AutoTokenizer

            # local_files_only: never reach for the hub, even for a missing optional file.
            return Tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True), path)
        if path.endswith(".gguf"):
            return _load_gguf_tokenizer(path)
        raise ModelLoadError(f"tokenizer path {path} is a file but not a .gguf; pass an HF directory or a .gguf")
    except ModelLoadError:
        raise
    except Exception as e:  # transformers raises OSError/ValueError/KeyError variants for unreadable tokenizers
        raise ModelLoadError(f"could not load a tokenizer from {path}: {e}") from e


def _tokenizer_cache_dir(path: str) -> str:
    """Where the converted form of a GGUF's tokenizer is kept, keyed by the file's path, size and mtime and by
    the transformers and tokenizers versions that converted it (read without importing transformers)."""
    from importlib.metadata import version

    stat = os.stat(path)
    identity = "|".join(str(x) for x in (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, version("transformers"),
                                        version("tokenizers"), _CACHE_VERSION))
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir("tokenizers", key)


def _load_gguf_tokenizer(path: str) -> Tokenizer:
    """Converting a GGUF vocabulary takes seconds (the metadata holds ~100k strings), so the converted
    tokenizer is saved once and loaded from the cache afterwards; a damaged entry is rebuilt."""
    entry = _tokenizer_cache_dir(path)
    if os.path.isdir(entry):
        try:
            return CachedTokenizer.load(entry, path)
        except Exception as e:  # missing spec, broken JSON, a tokenizer.json the library rejects
            logger.warning("rebuilding the tokenizer cache entry %s: %s", entry, e)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), local_files_only=True
    )
    if not hf.chat_template:
        hf.chat_template = _gguf_chat_template(path)
    _save_entry(hf, entry)
    return Tokenizer(hf, path)


def _save_entry(hf, entry: str) -> None:
    """Write the cache entry of a converted tokenizer atomically (concurrent loaders never see half of one).
    A tokenizer whose decode does more than the Rust decode gets no spec, so it is never loaded without hf."""
    tmp = f"{entry}.tmp{os.getpid()}"
    try:
        hf.save_pretrained(tmp)
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is not None and not getattr(hf, "clean_up_tokenization_spaces", False):
            backend.save(os.path.join(tmp, "tokenizer.json"))  # exactly the tokenizer that encodes (post-processor too)
            spec = {"chat_template": hf.chat_template, "special_tokens": dict(hf.special_tokens_map)}
            with open(os.path.join(tmp, _SPEC_FILE), "w", encoding="utf-8") as f:
                json.dump(spec, f, ensure_ascii=False)
        os.makedirs(os.path.dirname(entry), exist_ok=True)
        shutil.rmtree(entry, ignore_errors=True)  # a damaged entry in the way
        os.replace(tmp, entry)
    except OSError as e:
        logger.warning("could not cache the tokenizer in %s: %s", entry, e)  # costs the conversion next time
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_chat_template(path: str) -> Optional[str]:
    """The `tokenizer.chat_template` metadata string of a GGUF, in case transformers did not attach it."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.chat_template")
    return None if field is None else field.contents()
