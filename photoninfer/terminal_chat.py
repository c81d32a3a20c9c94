"""`photoninfer chat`: a conversation in the terminal, each token printed as the engine produces it."""

from __future__ import annotations

import itertools
import sys

from photoninfer.config import EngineConfig
from photoninfer.engine.llm_engine import LLMEngine
from photoninfer.sampling_params import SamplingParams

HELP = "Type a message and press Enter. /reset clears the conversation, /exit (or Ctrl-D) quits."


def stream_reply(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams, out=sys.stdout) -> str:
    """Run one request to completion, writing text deltas to `out`; returns the full reply."""
    engine.add_request(request_id, prompt, params)
    text = ""
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id != request_id:
                continue
            new_text = output.outputs[0].text
            out.write(new_text[len(text):])
            out.flush()
            text = new_text
    out.write("\n")
    return text


def chat_loop(config: EngineConfig, params: SamplingParams, system_prompt: str | None = None,
              stdin=sys.stdin, stdout=sys.stdout) -> None:
    engine = LLMEngine(config)
    history = [{"role": "system", "content": system_prompt}] if system_prompt else []
    start = len(history)
    print(f"PhotonInfer chat with {engine.model_name}. {HELP}", file=stdout)
    for turn in itertools.count():
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        message = line.strip()
        if not message:
            continue
        if message == "/reset":
            del history[start:]
            print("(conversation cleared)", file=stdout)
            continue
        history.append({"role": "user", "content": message})
        prompt = engine.tokenizer.encode_chat(history)
        reply = stream_reply(engine, f"chat-{turn}", prompt, params, out=stdout)
        history.append({"role": "assistant", "content": reply})
