import pytest

from mlxserve.core.templates import ChatTemplate, template_supports_tools
from mlxserve.errors import InvalidRequest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_renders_chatml_with_generation_prompt():
    t = ChatTemplate(CHATML)
    out = t.render([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_bos_token_and_tojson_are_available():
    t = ChatTemplate("{{ bos_token }}{{ messages[0] | tojson }}", bos_token="<s>")
    assert t.render([{"role": "user", "content": "é"}]) == '<s>{"role": "user", "content": "é"}'


def test_raise_exception_is_a_client_error():
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        t.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% set x = messages.append(1) %}{{ x }}",
    ],
)
def test_template_injection_is_refused(payload):
    t = ChatTemplate(payload)
    with pytest.raises(InvalidRequest):
        t.render([{"role": "user", "content": "x"}])


def test_missing_template_falls_back_to_chatml():
    out = ChatTemplate(None).render([{"role": "user", "content": "hi"}])
    assert out.endswith("<|im_start|>assistant\n")


def test_tool_support_detection():
    assert template_supports_tools("{% if tools %}...{% endif %}")
    assert not template_supports_tools(CHATML)
    assert not template_supports_tools(None)


def test_generation_tag_renders_its_body():
    # Hugging Face's training-mask tag (LFM2.5, Laguna templates).
    source = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
        "A:{{ m.content }}{% endgeneration %}{% else %}U:{{ m.content }}{% endif %}{% endfor %}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert ChatTemplate(source).render(messages) == "U:hiA:yo"
