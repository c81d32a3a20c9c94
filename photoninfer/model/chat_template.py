"""Render a model's jinja chat template as transformers' `apply_chat_template` does, without transformers.

Importing transformers costs about 1.5 s of a start-up; a tokenizer loaded from our own cache (tokenizer.py)
renders its template here instead. The environment is the one transformers builds (a sandbox with
trim_blocks/lstrip_blocks, loop controls, a `tojson` that keeps non-ASCII text, `raise_exception`,
`strftime_now`) and the template sees the same variables: messages, tools, documents, add_generation_prompt
and the tokenizer's special tokens (bos_token, eos_token, ...). Tests compare both renderings.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

# Names a message's reasoning may come under; transformers fills the first two from any of them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool,
                         special_tokens: dict) -> str:
    """The prompt text of `messages`; `special_tokens` maps e.g. "bos_token" to its string."""
    chat = [_normalize(m) for m in messages]
    return _compile(template).render(messages=chat, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **special_tokens)


def _normalize(message: dict) -> dict:
    """A copy without None values (as transformers drops them), with its reasoning under every name templates read."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks: rendered as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
