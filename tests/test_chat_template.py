"""render_chat gives apply_chat_template's string (and, encoded, its ids) for real-world chat templates, and turns
a template's refusals and faults into clear errors."""

import enum
import re

import jinja2
import pytest

from mmfm.chat_template import _compile, render_chat
from mmfm.errors import ConfigError, InputError

# Llama 3's shape: BOS written by the template, headers per role, content trimmed.
LLAMA3 = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}\n"
    "    {{- '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
# Mistral Instruct's: only user and assistant, strictly alternating, refused otherwise.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# What transformers gives templates beyond plain Jinja: tojson (non-ASCII and HTML left alone, indent), loop
# controls, namespace, {% generation %}, strftime_now, trim_blocks/lstrip_blocks, None-valued keys dropped.
FEATURES = """{%- set ns = namespace(n=0) -%}
{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
[{{ ns.n }}] {{ m.role | upper }}{% if m.name is defined %} ({{ m.name }}){% endif %}:
    {% generation %}{{ m.content | tojson }}{% endgeneration %}

    {% if ns.n >= 3 %}{% break %}{% endif %}
{% endfor %}
{{ {"year": strftime_now("%Y"), "html": "<a & b>", "é": [1, 2]} | tojson(indent=2) }}
{% if add_generation_prompt %}ASSISTANT:{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 2?"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "  Ahoy, matey!  "},
        {"role": "user", "content": "Where is the treasure? 🏴‍☠️"},
    ],
    [
        {"role": "user", "content": "Übersetze: 猫", "name": None},
        {"role": "assistant", "content": "Katze", "name": "bot"},
        {"role": "user", "content": "tabs\tand\nnewlines <|im_end|> inside"},
        {"role": "assistant", "content": ""},
    ],
]


def _alternating(conversation) -> bool:
    return all(m["role"] == ("user", "assistant")[i % 2] for i, m in enumerate(conversation))


@pytest.fixture(scope="module")
def templates(smollm2_tokenizers):
    return {"smollm2": smollm2_tokenizers[0]["tokenizer.chat_template"], "llama3": LLAMA3, "mistral": MISTRAL}


@pytest.mark.parametrize("name", ["smollm2", "llama3", "mistral", "features"])
def test_strings_and_ids_equal_apply_chat_template(name, templates, smollm2_tokenizers):
    _, ours, theirs = smollm2_tokenizers
    template = templates.get(name, FEATURES)
    rendered = 0
    for conversation in CONVERSATIONS:
        if name == "mistral" and not _alternating(conversation):
            continue
        for add_generation_prompt in (False, True):
            text = render_chat(
                template,
                conversation,
                add_generation_prompt=add_generation_prompt,
                bos_token=ours.bos_token,
                eos_token=ours.eos_token,
            )
            kwargs = {"chat_template": template, "add_generation_prompt": add_generation_prompt}
            assert text == theirs.apply_chat_template(conversation, tokenize=False, **kwargs)
            assert ours.encode(text) == theirs.apply_chat_template(conversation, tokenize=True, **kwargs)["input_ids"]
            rendered += 1
    assert rendered >= 4


def test_the_smollm2_template_renders_chatml(templates):
    text = render_chat(templates["smollm2"], CONVERSATIONS[0], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_undefined_special_tokens_render_empty_not_none():
    assert render_chat("[{{ bos_token }}|{{ eos_token }}]", []) == "[|]"
    assert render_chat("{{ greeting }}, {{ tools }}", [], greeting="hi") == "hi, None"  # tools=None, as transformers


def test_message_values_reach_the_template_as_plain_data():
    class Role(str, enum.Enum):
        USER = "user"

    class Image:
        pass

    template = "{% for m in messages %}{{ m.role }}:{{ m.content | tojson }}{% endfor %}"
    content = [{"type": "image", "image": Image()}, {"type": "text", "text": "caption this"}]
    assert render_chat(template, [{"role": Role.USER, "content": content}]) == (
        'user:[{"type": "image", "image": "<Image>"}, {"type": "text", "text": "caption this"}]'
    )


def test_compiled_templates_are_cached():
    assert _compile(LLAMA3) is _compile(LLAMA3)


# ---- bad input ----


def test_a_template_that_refuses_the_messages_is_an_input_error_quoting_it(smollm2_tokenizers):
    theirs = smollm2_tokenizers[2]
    refused = {
        "Only user and assistant roles are supported!": [
            {"role": "user", "content": "a"},
            {"role": "tool", "content": "b"},
        ],
        "Conversation roles must alternate user/assistant/user/assistant/...": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
        ],
    }
    for message, conversation in refused.items():
        with pytest.raises(InputError, match=f"the chat template refuses these messages: {re.escape(message)}$"):
            render_chat(MISTRAL, conversation, bos_token="<s>", eos_token="</s>")
        with pytest.raises(jinja2.TemplateError, match=re.escape(message)):  # where transformers refuses too
            theirs.apply_chat_template(conversation, chat_template=MISTRAL, tokenize=False)
    with pytest.raises(InputError, match=r"failed on these messages \(TypeError: .*concatenate"):
        render_chat(MISTRAL, [{"role": "user", "content": ["a list"]}], bos_token="<s>")


def test_a_template_syntax_error_or_sandbox_escape_is_a_config_error():
    with pytest.raises(ConfigError, match=r"not valid Jinja \(line 1: .*endfor"):
        render_chat("{% for m in messages %}{{ m.content }}", CONVERSATIONS[0])
    with pytest.raises(ConfigError, match="sandbox forbids"):
        render_chat("{{ messages.append(1) }}", CONVERSATIONS[0])
    with pytest.raises(ConfigError, match="sandbox forbids"):
        render_chat("{{ messages.__class__.__mro__ }}", CONVERSATIONS[0])


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", "messages must be a list .* got str"),
        ({"role": "user", "content": "hi"}, "messages must be a list .* got dict"),
        ([{"role": "user", "content": "hi"}, "oops"], r"messages\[1\] must be a mapping .* got 'oops'"),
        ([{"content": "hi"}], r"messages\[0\] needs a str 'role' and a 'content'"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\] needs a str 'role' and a 'content'"),
        ([{"role": 3, "content": "hi"}], r"messages\[0\] needs a str 'role'"),
    ],
)
def test_messages_not_a_list_of_role_content_mappings_are_input_errors(messages, message):
    with pytest.raises(InputError, match=message):
        render_chat(LLAMA3, messages)
