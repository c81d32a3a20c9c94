"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF): 32 greedy tokens equal HF transformers
loading the same file."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from photoninfer import LLM, SamplingParams

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three colors."}],
    [{"role": "user", "content": "Write a haiku about the sea 🌊."}],
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def llm(default_gguf_path):
    return LLM(default_gguf_path, dtype="float32", device="cpu")


def test_chat_prompts_match_hf_greedy(llm, default_gguf_path):
    folder, name = os.path.split(default_gguf_path)
    hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    # min_tokens bans EOS like HF's min_new_tokens does, so both run the full 32 tokens
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    outputs = llm.chat(CHATS, params)
    for chat, out in zip(CHATS, outputs):
        prompt_ids = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert out.prompt_token_ids == list(prompt_ids)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, pad_token_id=hf_tok.eos_token_id)
        assert out.outputs[0].token_ids == ref[0, len(prompt_ids):].tolist()


def test_default_model_stops_at_im_end(llm):
    out = llm.chat(CHATS[0], SamplingParams(temperature=0.0, max_tokens=200))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert "Paris" in out.text and "<|im_end|>" not in out.text


def test_tokenizer_round_trips_emoji_and_cjk(llm):
    tok = llm.get_tokenizer()
    for text in ["Hello 👋🏽 world", "日本語のテキスト、中文字符", "naïve café — ελληνικά", "👨‍👩‍👧 family 🇫🇷"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
