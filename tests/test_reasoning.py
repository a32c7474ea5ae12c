import pytest

from mlxserve.core.reasoning import (
    ReasoningSplitter,
    prompt_opens_thinking,
)


def split(chunks, **kw):
    s = ReasoningSplitter(**kw)
    pieces = [p for c in chunks for p in s.feed(c)] + s.finish()
    reasoning = "".join(t for r, t in pieces if r)
    content = "".join(t for r, t in pieces if not r)
    return reasoning, content


# Recorded shapes of real outputs: Qwen3 / DeepSeek-R1 (tag opened by the model or by the prompt)
@pytest.mark.parametrize(
    ("chunks", "kw", "expected"),
    [
        (["<think>\nLet me add.\n</think>\n\nIt is 4."], {}, ("\nLet me add.\n", "It is 4.")),
        (["<th", "ink>hm", "m</th", "ink>", "\n\nDone"], {}, ("hmm", "Done")),
        (["Okay, 2+2.\n</think>\n\n4"], {"in_reasoning": True}, ("Okay, 2+2.\n", "4")),
        (["\n\n<think>x</think>y"], {}, ("x", "y")),
        (["No thinking here. <think> is text"], {}, ("", "No thinking here. <think> is text")),
        (["<think>never closed"], {}, ("never closed", "")),
        (["<think>\n\n</think>\n\nAnswer"], {}, ("\n\n", "Answer")),
        (["plain"], {}, ("", "plain")),
        (["<", "b>bold"], {}, ("", "<b>bold")),
    ],
)
def test_split(chunks, kw, expected):
    assert split(chunks, **kw) == expected


def test_char_by_char_matches_whole():
    text = "<think>a < b and </thin is not the end</think>\nanswer </think> stays"
    assert (
        split(list(text))
        == split([text])
        == ("a < b and </thin is not the end", "answer </think> stays")
    )


def test_support_detection():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
