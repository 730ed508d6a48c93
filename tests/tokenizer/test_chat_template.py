"""Chat templates rendered as Hugging Face transformers renders them."""

from __future__ import annotations

import pytest

from kiln.errors import KilnError, UnsupportedError, UsageError
from kiln.tokenizer import ChatTemplateError, Tokenizer, render_chat

# SmolLM2-135M-Instruct's template (tokenizer.chat_template of the demo model)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2-style ChatML (the template in ggml-vocab-qwen2.gguf)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta Llama 3 Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

USER = [{"role": "user", "content": "Hi there!"}]


def test_smollm2_default_system_prompt():
    assert render_chat(SMOLLM2, USER) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(SMOLLM2, USER, add_generation_prompt=False).endswith(
        "<|im_start|>user\nHi there!<|im_end|>\n"
    )


def test_demo_model_template(demo_model):
    from kiln.gguf.reader import read_gguf

    model = read_gguf(demo_model)
    assert model.metadata["tokenizer.chat_template"] == SMOLLM2
    assert render_chat(model, USER) == render_chat(SMOLLM2, USER)


def test_qwen_chatml_with_system():
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Thanks"},
    ]
    assert render_chat(QWEN2, messages) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_llama3_template_with_bos():
    messages = [
        {"role": "system", "content": "You are helpful.  "},
        {"role": "user", "content": "Hello"},
    ]
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful."
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render_chat(LLAMA3, messages, bos_token="<|begin_of_text|>") == expected


def test_llama3_encode_chat_has_one_bos():
    from tests.tokenizer.test_vectors import load_vocab

    tok = load_vocab("llama-bpe")
    md_tok = _with_template(tok, LLAMA3)
    text = md_tok.render_chat([{"role": "user", "content": "Hello"}])
    assert text.startswith("<|begin_of_text|><|start_header_id|>user")  # bos_token from vocab
    ids = md_tok.encode_chat([{"role": "user", "content": "Hello"}])
    assert ids[:3] == [128000, 128006, 882] and ids.count(128000) == 1
    assert ids[-4:] == [128006, 78191, 128007, 271]


def test_qwen2_vocab_template():
    from tests.tokenizer.test_vectors import load_vocab

    tok = load_vocab("qwen2")
    assert tok.chat_template == QWEN2
    ids = tok.encode_chat(USER)
    assert ids[0] == tok.token_id("<|im_start|>") and tok.bos_id not in ids  # qwen2: no BOS
    assert tok.decode(ids, skip_special=False) == render_chat(QWEN2, USER)


def test_hf_environment_features():
    t = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% endfor %}|{{ tools | tojson(indent=1) }}|{{ foo }}|"
        "{% generation %}gen{% endgeneration %}|{{ strftime_now('%Y') | length }}"
    )
    out = render_chat(
        t,
        [{"role": "user", "content": "é <b>&"}, {"role": "assistant", "content": ""}],
        tools=[{"a": 1}],
        foo="bar",
    )
    assert out == '{"role": "user", "content": "é <b>&"}|[\n {\n  "a": 1\n }\n]|bar|gen|4'


def test_trim_and_lstrip_blocks():
    t = (
        "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n"
        "{% endif %}\n{% endfor %}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert render_chat(t, messages) == "[a]\n[b]\n"


def test_template_raises():
    t = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start "
    t += "with a user message') }}{% endif %}ok"
    assert render_chat(t, USER) == "ok"
    with pytest.raises(ChatTemplateError, match="Conversation must start with a user message"):
        render_chat(t, [{"role": "assistant", "content": "x"}])
    assert issubclass(ChatTemplateError, KilnError)


def test_template_errors():
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        render_chat("{% for m in messages %}", USER)
    with pytest.raises(ChatTemplateError, match="failed"):
        render_chat("{{ messages.append(1) }}", USER)  # the sandbox keeps messages immutable
    with pytest.raises(ChatTemplateError, match="failed"):
        render_chat("{{ 1 / 0 }}", USER)


def test_model_without_template():
    md = {"general.name": "plain-model", "tokenizer.ggml.model": "gpt2"}
    with pytest.raises(UnsupportedError, match=r"model plain-model has no chat template.*kiln run"):
        render_chat(md, USER)


def test_named_template():
    md = {
        "general.name": "m",
        "tokenizer.chat_template": "default",
        "tokenizer.chat_template.tool_use": "tools:{{ tools | length }}",
    }
    assert render_chat(md, USER, template_name="tool_use", tools=[1, 2]) == "tools:2"
    with pytest.raises(UsageError, match="no chat template named 'rag'.*tool_use"):
        render_chat(md, USER, template_name="rag")


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "must be a list"),
        ([], "empty"),
        (["hi"], r"messages\[0\] must be a dict"),
        ([{"content": "x"}], r"messages\[0\]: 'role' must be a non-empty str \(missing\)"),
        ([{"role": "user"}], "has no 'content'"),
        ([{"role": "user", "content": 3}], "'content' must be a str, not int"),
        ([USER[0], {"role": "user", "content": None}], r"messages\[1\]"),
    ],
)
def test_bad_messages(messages, match):
    with pytest.raises(UsageError, match=match):
        render_chat(SMOLLM2, messages)


def test_tool_call_message_may_have_no_content():
    t = "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
    messages = [USER[0], {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    assert render_chat(t, messages) == "user:Hi there!;assistant:None;"


def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
    import copy

    clone = copy.copy(tok)
    clone.chat_template = template
    return clone
