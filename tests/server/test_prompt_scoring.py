"""Scoring prompts through /v1/completions (`echo` + `logprobs`, `max_tokens: 0`) on a tiny random model,
checked against HF transformers' log_softmax in float32: with the official `openai` client, streamed and not,
and with lm-evaluation-harness's `local-completions` running a multiple-choice and a loglikelihood_rolling
task on local data. The server chunks prefills (small token budget) and keeps prefix caching on."""

from __future__ import annotations

import json
import math

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.timeout(300)

MODEL_NAME = "tiny"
TOL = 1e-4  # per token
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs home."


@pytest.fixture(scope="module")
def model_dir(make_tiny_model) -> str:
    return make_tiny_model("llama3")


@pytest.fixture(scope="module")
def tiny_server(start_server, model_dir):
    return start_server(["--model", model_dir, "--served-model-name", MODEL_NAME, "--max-model-len", "256",
                         "--max-num-batched-tokens", "32", "--dtype", "float32"]).wait_ready()


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def hf_logprobs(hf, token_ids: list[int]) -> torch.Tensor:
    """[len - 1, V]: row i is the log_softmax predicting token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([token_ids])).logits[0, :-1].float(), dim=-1)


def hf_greedy(hf, token_ids: list[int], count: int) -> tuple[list[int], list[float]]:
    """HF's greedy continuation and each chosen token's logprob."""
    token_ids, chosen = list(token_ids), []
    with torch.no_grad():
        for _ in range(count):
            row = torch.log_softmax(hf(torch.tensor([token_ids])).logits[0, -1].float(), dim=-1)
            token_ids.append(int(row.argmax()))
            chosen.append(float(row.max()))
    return token_ids[-count:], chosen


def hf_loglikelihood(hf, context: list[int], continuation: list[int]) -> float:
    rows = hf_logprobs(hf, context + continuation)[len(context) - 1:]
    return float(rows.gather(1, torch.tensor(continuation).unsqueeze(1)).sum())


def check_prompt_part(logprobs, prompt_ids: list[int], tokenizer, hf, top_n: int) -> None:
    """The first len(prompt_ids) entries of a legacy logprobs object score the prompt like HF does."""
    count = len(prompt_ids)
    assert logprobs.tokens[:count] == [tokenizer.decode([t]) for t in prompt_ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    reference = hf_logprobs(hf, prompt_ids)
    for i, token in enumerate(prompt_ids[1:]):
        assert abs(logprobs.token_logprobs[i + 1] - float(reference[i, token])) < TOL
        best = torch.topk(reference[i], top_n)
        top = logprobs.top_logprobs[i + 1]
        assert list(top) == [tokenizer.decode([t]) for t in best.indices.tolist()]
        assert list(top.values()) == pytest.approx(best.values.tolist(), abs=TOL)
    ends = [o + len(t) for o, t in zip(logprobs.text_offset, logprobs.tokens)]
    assert logprobs.text_offset[1:] == ends[:-1] and logprobs.text_offset[0] == 0


def test_echo_with_logprobs_and_max_tokens_zero_scores_the_prompt(client, tokenizer, hf):
    prompt_ids = tokenizer.encode(PROMPT)
    reply = client.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0,
                                      temperature=0)
    choice = reply.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(prompt_ids)
    check_prompt_part(choice.logprobs, prompt_ids, tokenizer, hf, 2)
    assert reply.usage.prompt_tokens == len(prompt_ids) and reply.usage.completion_tokens == 0


def test_echo_with_logprobs_then_generated_tokens(client, tokenizer, hf):
    """A batch of token-id prompts (as lm-evaluation-harness sends them), n=2, three new tokens each."""
    prompts = [tokenizer.encode(PROMPT), tokenizer.encode("Once upon a time")]
    reply = client.completions.create(model=MODEL_NAME, prompt=prompts, echo=True, logprobs=1, max_tokens=3,
                                      temperature=0, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for choice in reply.choices:
        prompt_ids = prompts[choice.index // 2]
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(prompt_ids) + 3
        check_prompt_part(logprobs, prompt_ids, tokenizer, hf, 1)
        generated, chosen = hf_greedy(hf, prompt_ids, 3)
        assert logprobs.tokens[len(prompt_ids):] == [tokenizer.decode([t]) for t in generated]
        assert logprobs.token_logprobs[len(prompt_ids):] == pytest.approx(chosen, abs=TOL)
        assert choice.text == tokenizer.decode(prompt_ids, skip_special_tokens=True) + tokenizer.decode(generated)


def test_streamed_echo_with_logprobs_equals_the_whole_answer(client):
    ask = dict(model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=3, max_tokens=4, temperature=0)
    whole = client.completions.create(**ask).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**ask, stream=True)]
    assert "".join(c.text for c in chunks) == whole.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks if c.logprobs for x in getattr(c.logprobs, field)] == \
            getattr(whole.logprobs, field)
    assert chunks[-1].finish_reason == "length"


@pytest.mark.parametrize("fields,param", [({"max_tokens": -1}, "max_tokens"), ({"logprobs": 21}, "logprobs")])
def test_bad_scoring_requests_are_400(client, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**{"model": MODEL_NAME, "prompt": PROMPT, "echo": True, "logprobs": 1,
                                     "max_tokens": 0, **fields})
    assert err.value.body["param"] == param


# ------------------------------------------------------------------------------ lm-evaluation-harness

MULTIPLE_CHOICE = [
    {"question": "The color of the clear sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "seven"], "answer": 0},
    {"question": "Cats like to chase", "choices": ["mice", "cars", "clouds", "numbers"], "answer": 0},
]
DOCUMENTS = [  # the last one spans several of the harness's rolling windows (max_length 64)
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step. " * 2,
    "It was the best of times, it was the worst of times, it was the age of wisdom. " * 8,
]


def write_tasks(root) -> None:
    """Two task configs over local JSON lines files: nothing comes from the hub."""
    for name, rows in (("mc", MULTIPLE_CHOICE), ("rolling", [{"text": d} for d in DOCUMENTS])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (root / "mc.yaml").write_text("task: photoninfer_mc\n" + common.format(path=root / "mc.jsonl") + (
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"))
    (root / "rolling.yaml").write_text("task: photoninfer_rolling\n" + common.format(path=root / "rolling.jsonl") + (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n"))


def rolling_windows(lm, text: str) -> list[tuple[list[int], list[int]]]:
    """The (context, continuation) token windows the harness scores for a document."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = get_rolling_token_windows(token_list=lm.tok_encode(text), prefix_token=lm.prefix_token_id,
                                        max_seq_len=lm.max_length - 1, context_len=1)
    return [make_disjoint_window(w) for w in windows]


def test_lm_eval_local_completions_agrees_with_hf(tiny_server, model_dir, hf, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    write_tasks(tmp_path)
    lm = LocalCompletionsAPI(base_url=f"{tiny_server.url}/v1/completions", model=MODEL_NAME, tokenizer=model_dir,
                             tokenizer_backend="huggingface", max_length=64, batch_size=4)
    results = lm_eval.simple_evaluate(model=lm, tasks=["photoninfer_mc", "photoninfer_rolling"],
                                      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                      log_samples=True, bootstrap_iters=0)
    samples = results["samples"]

    correct = 0
    for sample in samples["photoninfer_mc"]:
        ours = [resp[0][0] for resp in sample["resps"]]
        reference = []
        for context, continuation in sample["arguments"]:
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
            reference.append(hf_loglikelihood(hf, context_ids, continuation_ids))
            assert abs(ours[len(reference) - 1] - reference[-1]) < TOL * len(continuation_ids)
        correct += max(range(len(reference)), key=reference.__getitem__) == sample["doc"]["answer"]
    assert len(samples["photoninfer_mc"]) == len(MULTIPLE_CHOICE)
    assert results["results"]["photoninfer_mc"]["acc,none"] == pytest.approx(correct / len(MULTIPLE_CHOICE))

    assert len(samples["photoninfer_rolling"]) == len(DOCUMENTS)
    for sample in samples["photoninfer_rolling"]:
        windows = rolling_windows(lm, sample["doc"]["text"])
        reference = sum(hf_loglikelihood(hf, context, continuation) for context, continuation in windows)
        num_tokens = sum(len(continuation) for _, continuation in windows)
        assert abs(sample["resps"][0][0] - reference) < TOL * num_tokens
        assert math.isfinite(sample["resps"][0][0])
    assert len(rolling_windows(lm, DOCUMENTS[-1])) > 1
