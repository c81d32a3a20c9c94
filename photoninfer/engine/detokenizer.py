"""Incremental detokenization with stop-string handling, for streaming.

Decoding the whole output after every token costs O(n) per step. Instead a short window of recent token
ids is decoded: it starts one chunk before the newest tokens (and before the first output token, it starts
inside the prompt), so tokenizers that drop a leading space at the start of a decode still give the first
generated token its space. This is the scheme of `tokenizers`' own `DecodeStream`, which does it in Rust
with one call per token; we use it for fast (Rust-backed) tokenizers and keep the same window here, so a
slow tokenizer, or a stream that gives up on invalid bytes, continues from the same state in Python.

Byte-level BPE tokens can end halfway through a UTF-8 character; decode then shows U+FFFD at the end.
`DecodeStream` then returns nothing; we still pass on the whole characters before it, and the rest waits
until a later token completes the character.
"""

from __future__ import annotations

from typing import Optional

REPLACEMENT_CHAR = "\ufffd"
# How many prompt tokens go in front of the first output token. One would do for the leading-space
# problem. A few more allow for a last prompt token that is itself only part of a character.
PROMPT_CONTEXT_TOKENS = 5


def _rust_backend(tokenizer):
    """The `tokenizers.Tokenizer` behind a fast HF tokenizer whose decode adds nothing in Python, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None  # a slow tokenizer, or one whose decode rewrites spaces after the Rust decode
    return backend


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text, token by token.

    `output_text` only ever grows: a streaming server can send `output_text[len(previously_sent):]`.
    It never shows a stop string (unless `include_stop_str_in_output`) and never shows the end of the
    text while that end could still be the start of a stop string. As in vLLM, a stop string ends the
    output only when it is completed by a token after the first `min_tokens`.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], *, skip_special_tokens: bool = True,
                 stop: list[str] = (), include_stop_str_in_output: bool = False, min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        if isinstance(stop, str):
            stop = [stop]
        self.stop = [s for s in stop if s]  # an empty stop string would match at once
        self._stop_prefixes = [(s, _proper_prefix_lengths(s)) for s in self.stop]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens
        self.num_tokens = 0  # tokens taken by add_token

        self._backend = _rust_backend(tokenizer)
        self.output_text = ""
        self.stop_reason: str | None = None
        self.finished = False  # set by a stop match or finish(); add_token then refuses
        self._held = ""  # decoded text kept back because it may be the start of a stop string

        # _ids holds the prompt context and then every output token. The window is _ids[_prefix:]; its
        # first tokens, _ids[_prefix:_read], were handed on already and are only there as context.
        # _partial is how much of the window's text beyond them was handed on (the whole characters
        # before an incomplete one). _prefix_len caches len(text of the context tokens).
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        context_text = self._decode(context)
        if context_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character. The output's first bytes would finish it, but a full
            # decode of the output alone would not, so leave the prompt out of the window.
            context, context_text = [], ""
        self._ids = context
        self._prefix, self._read = 0, len(context)
        self._prefix_len: Optional[int] = len(context_text)
        self._partial = 0
        self._stream = self._new_stream(context) if self._backend is not None else None

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:  # the same text, without the HF wrapper's Python overhead
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _new_stream(self, context: list[int]):
        from tokenizers.decoders import DecodeStream

        return DecodeStream(ids=context, skip_special_tokens=self.skip_special_tokens)

    def decode_token(self, token_id: int) -> str:
        """One token's own text, for logprob display. Special tokens show; a part of a character shows as U+FFFD."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def add_token(self, token_id: int) -> None:
        """Take one generated token. Must not be called after a stop string matched or after finish()."""
        if self.finished:
            raise RuntimeError(
                f"add_token called on a finished sequence (stop_reason={self.stop_reason!r})")
        self._ids.append(token_id)
        self.num_tokens += 1
        piece = None
        if self._stream is not None:  # the common case, inline: it runs once per token of every sequence
            try:
                piece = self._stream.step(self._backend, token_id)
            except Exception:
                # DecodeStream refuses a window whose text no longer starts with its context's text (invalid
                # bytes that a later byte turned into a character). Go on in Python from the same window.
                self._stream = None
        if self._stream is None:
            piece = self._complete_piece()
        if piece is not None:
            new_text = piece[self._partial:] if self._partial else piece
            # The window ends on a whole character: move it up, the last chunk staying as context.
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_len, self._partial = None, 0
        else:
            new_text = self._whole_characters()
        if self.stop:
            self._add_text(new_text, final=False)
        else:
            self.output_text += new_text

    def _complete_piece(self) -> Optional[str]:
        """Without a DecodeStream: the window's text beyond its context, if it grew and ends on a whole
        character; else None."""
        text = self._decode(self._ids[self._prefix:])
        prefix_len = self._context_len()
        if len(text) > prefix_len and not text.endswith(REPLACEMENT_CHAR):
            return text[prefix_len:]
        return None

    def _whole_characters(self) -> str:
        """New text of a window that ends inside a character (or did not grow): what lies before it."""
        text = self._decode(self._ids[self._prefix:])
        start = self._context_len() + self._partial
        stable = len(text.rstrip(REPLACEMENT_CHAR))
        self._partial = max(self._partial, stable - self._context_len())
        return text[start:stable]

    def _context_len(self) -> int:
        if self._prefix_len is None:
            self._prefix_len = len(self._decode(self._ids[self._prefix:self._read]))
        return self._prefix_len

    def finish(self) -> None:
        """The sequence ended for another reason (EOS, length): show everything still held back."""
        if self.finished:
            return
        # Trailing incomplete bytes come out as U+FFFD, just as a full decode shows them.
        text = self._decode(self._ids[self._prefix:])
        self._add_text(text[self._context_len() + self._partial:], final=True)
        self.finished = True

    def _add_text(self, new_text: str, *, final: bool) -> None:
        if not self.stop:
            self.output_text += new_text
            return
        # A stop match must start inside held + new text: the visible text never ends with the start of
        # a stop string, and a match wholly inside the held text would have been found earlier.
        buf = self._held + new_text
        match = self._find_stop(buf, len(self._held)) if self.num_tokens > self.min_tokens else None
        if match is not None:
            start, stop = match
            end = start + len(stop) if self.include_stop_str_in_output else start
            self.output_text += buf[:end]
            self._held = ""
            self.stop_reason = stop
            self.finished = True
            return
        hold = 0 if final else self._stop_prefix_len(buf)
        self.output_text += buf[:len(buf) - hold]
        self._held = buf[len(buf) - hold:]

    def _find_stop(self, buf: str, held: int) -> tuple[int, str] | None:
        """The stop string that starts first in buf and ends after its first `held` characters (on a tie,
        the shorter one: it was complete first). One that ended within the held text was completed
        within min_tokens."""
        best = None
        for s in self.stop:
            i = buf.find(s, max(0, held - len(s) + 1))
            if i >= 0 and (best is None or (i, len(s)) < (best[0], len(best[1]))):
                best = (i, s)
        return best

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest end of buf that is the start of some stop string."""
        if not buf:
            return 0
        longest = 0
        for s, lengths in self._stop_prefixes:
            for k in lengths.get(buf[-1], ()):  # only prefixes ending in buf's last character can match
                if k <= longest:
                    break
                if k <= len(buf) and buf.endswith(s[:k]):
                    longest = k
                    break
        return longest


def _proper_prefix_lengths(stop: str) -> dict[str, list[int]]:
    """The lengths of `stop`'s proper prefixes by their last character, longest first."""
    lengths: dict[str, list[int]] = {}
    for k in range(len(stop) - 1, 0, -1):
        lengths.setdefault(stop[k - 1], []).append(k)
    return lengths
