import pytest

from mlxserve.core.chatstore import ChatStore, ResponseNotFound


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_branches_see_only_their_history(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    one = store.save(
        parent_id=None, model="m", system="be brief", input=[user("1")], output=[assistant("a1")]
    )
    two = store.save(
        parent_id=one, model="m", system=None, input=[user("2")], output=[assistant("a2")]
    )
    three = store.save(
        parent_id=two, model="m", system=None, input=[user("3")], output=[assistant("a3")]
    )
    branch = store.save(
        parent_id=one, model="m", system="be long", input=[user("2b")], output=[assistant("b2")]
    )
    conv = store.conversation(three)
    assert [m["content"] for m in conv.messages] == ["1", "a1", "2", "a2", "3", "a3"]
    assert conv.system == "be brief"
    conv = store.conversation(branch)
    assert [m["content"] for m in conv.messages] == ["1", "a1", "2b", "b2"]
    assert conv.system == "be long"


def test_survives_reopen_and_unknown_ids_raise(tmp_path):
    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    rid = store.save(parent_id=None, model="m", system=None, input=[user("x")], output=[])
    store.close()
    again = ChatStore(path)
    assert again.conversation(rid).messages == [user("x")]
    with pytest.raises(ResponseNotFound) as e:
        again.conversation("resp_nope")
    assert e.value.status == 404
    with pytest.raises(ResponseNotFound) as e:
        again.conversation("../../etc/passwd")
    assert "etc" not in e.value.message
