from mlxserve.core.textstream import TextAssembler

PIECES = {i: ch.encode() for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz ")}


def run(ids, stops=(), **kw):
    asm = TextAssembler(lambda i: PIECES[i], stops, **kw)
    out = [asm.add(i) for i in ids]
    out.append(asm.finish())
    return "".join(out), asm.stopped, out


def ids(text):
    inv = {v.decode(): k for k, v in PIECES.items()}
    return [inv[c] for c in text]


def test_plain_text_passes_through_token_by_token():
    text, stopped, parts = run(ids("hello world"))
    assert text == "hello world" and not stopped
    assert parts[:3] == ["h", "e", "l"]


def test_stop_string_is_cut_and_never_emitted():
    text, stopped, _ = run(ids("hello world"), stops=("lo w",))
    assert text == "hel" and stopped


def test_partial_stop_is_held_back_then_released():
    text, stopped, parts = run(ids("abcabd"), stops=("abx",))
    assert text == "abcabd" and not stopped
    # "a" and "ab" could begin the stop string, so they wait for the next token
    assert parts[:3] == ["", "", "abc"]


def test_earliest_of_several_stops_wins():
    text, _, _ = run(ids("one two three"), stops=("three", "two"))
    assert text == "one "


def test_utf8_split_across_tokens_is_joined():
    snow = "☃".encode()
    pieces = {0: snow[:1], 1: snow[1:2], 2: snow[2:], 3: b"!"}
    asm = TextAssembler(lambda i: pieces[i])
    assert [asm.add(i) for i in range(4)] == ["", "", "☃", "!"]


def test_invalid_bytes_become_replacement_characters():
    asm = TextAssembler(lambda i: b"\xff")
    assert asm.add(0) + asm.finish() == "\ufffd"


def test_truncated_utf8_at_end_is_flushed():
    asm = TextAssembler(lambda i: "é".encode()[:1])
    assert asm.add(0) == ""
    assert asm.finish() == "\ufffd"


def test_leading_space_strip_for_sentencepiece():
    text, _, _ = run(ids(" hi there"), strip_leading_space=True)
    assert text == "hi there"
