"""A model's Jinja chat template, rendered as transformers' `apply_chat_template` renders it.

Chat templates come with the model (tokenizer_config.json, GGUF metadata), so they are untrusted code: they run in
jinja2's immutable sandbox, with the options and helpers transformers gives them (`trim_blocks`, `lstrip_blocks`,
`{% break %}`/`{% continue %}`, a `tojson` that leaves non-ASCII and HTML characters alone, `raise_exception`,
`strftime_now`, and `{% generation %}` blocks rendered as their content), so the same template gives the same string.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mmfm.config import quote
from mmfm.errors import ConfigError, InputError


class _TemplateRaised(jinja2.TemplateError):
    """What a template's `raise_exception(message)` raises: the template refusing the messages it was given."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates want the JSON itself.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks the assistant's text for training masks in transformers;
    rendered here as its content, in a scope of its own as there."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **extra: Any,
) -> str:
    """The prompt text `template` makes of a conversation: `apply_chat_template(..., tokenize=False)`'s string.

    Encode it with `HFTokenizer.encode` (no BOS added: templates that want BOS write `bos_token` themselves) to get
    `apply_chat_template(..., tokenize=True)`'s ids. Compiled templates are cached.

    Args:
        template: the Jinja chat template.
        messages: the conversation, `[{"role": "system" | "user" | "assistant", "content": str}, ...]`; keys whose
            value is None are dropped and values other than plain data (str, numbers, lists, mappings) are shown to
            the template as `"<TypeName>"`, as transformers does.
        add_generation_prompt: end with the text that starts the assistant's reply.
        bos_token: the tokenizer's BOS token, for templates that write it; None leaves it undefined.
        eos_token: the tokenizer's EOS token, likewise.
        **extra: more template variables (`tools`, `documents`, `date_string`, ...).

    Returns:
        The rendered conversation.

    Raises:
        InputError: `messages` is not a list of mappings with a str "role" and a "content", the template refuses
            the conversation (its `raise_exception` message is quoted: an unknown role, roles out of order), or it
            fails on it.
        ConfigError: `template` is not valid Jinja, or does what its sandbox forbids (calls a method that changes
            data, reads a private attribute).
    """
    chat = _plain_messages(messages)
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
    variables = {"tools": None, "documents": None, "add_generation_prompt": add_generation_prompt}
    for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
        if token is not None:  # else undefined, so "{{ bos_token }}" writes nothing (not "None"), as in transformers
            variables[name] = token
    variables.update(extra)
    try:
        return compiled.render(messages=chat, **_plain(variables))
    except _TemplateRaised as e:
        raise InputError(f"the chat template refuses these messages: {e.message}") from None
    except jinja2.exceptions.SecurityError as e:
        raise ConfigError(f"the chat template did something its sandbox forbids ({e})") from None
    except (jinja2.TemplateError, TypeError, ValueError) as e:  # the template's own code failing on this input
        raise InputError(f"the chat template failed on these messages ({type(e).__name__}: {e})") from None


def _plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`messages` checked and copied as plain data, the keys whose value is None dropped."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InputError(f"messages must be a list of {{'role', 'content'}} mappings, got {type(messages).__name__}")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"messages[{i}] must be a mapping with 'role' and 'content', got {quote(message)}")
        if not isinstance(message.get("role"), str) or "content" not in message:
            raise InputError(f"messages[{i}] needs a str 'role' and a 'content', got {quote(message)}")
        chat.append({key: value for key, value in _plain(dict(message)).items() if value is not None})
    return chat


def _plain(value: Any) -> Any:
    """`value` rebuilt from plain str, int, float, bool, None, list, tuple and dict; anything else (an image, an
    array) becomes `"<TypeName>"`, so the sandboxed template never holds an object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # A subclass (a str enum, numpy's float64) may carry methods of its own: keep only the value, by the base type's
    # conversion (the subclass may override str(), int(), float()).
    for base in (str, int, float):
        if isinstance(value, base):
            return getattr(base, f"__{base.__name__}__")(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return f"<{type(value).__name__}>"
