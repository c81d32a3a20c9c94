"""The `photoninfer` command line, run as a real subprocess on a tiny model."""

import subprocess
import sys

from photoninfer import LLM, SamplingParams


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "photoninfer", "--log-level", "WARNING", *args],
                          input=stdin, capture_output=True, text=True, timeout=300)


def test_generate_prints_the_same_text_as_the_offline_api(make_tiny_model):
    model = make_tiny_model("qwen3")
    result = run_cli("generate", "--model", model, "--prompt", "Hello there", "--max-tokens", "8", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    expected = LLM(model, device="cpu").generate("Hello there", SamplingParams(temperature=0, max_tokens=8))
    assert result.stdout == expected[0].outputs[0].text + "\n"


def test_chat_streams_replies_and_keeps_history(make_tiny_model):
    model = make_tiny_model("smollm2")
    result = run_cli("chat", "--model", model, "--max-tokens", "6", "--device", "cpu",
                     stdin="Hi!\n/reset\nAnother question\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "PhotonInfer chat with" in result.stdout
    assert result.stdout.count("> ") >= 4 and "(conversation cleared)" in result.stdout


def test_missing_model_is_a_clear_error_not_a_traceback(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_cli("generate", "--model", str(missing), "--prompt", "x")
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


def test_bad_sampling_value_is_a_clear_error(make_tiny_model):
    result = run_cli("generate", "--model", make_tiny_model("qwen3"), "--prompt", "x", "--top-p", "0")
    assert result.returncode == 2 and "top_p" in result.stderr
