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


def test_a_database_from_before_chats_gets_its_chats(tmp_path):
    import sqlite3

    path = tmp_path / "chats.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE responses (id TEXT PRIMARY KEY, parent_id TEXT, model TEXT NOT NULL,"
        " system TEXT, input TEXT NOT NULL, output TEXT NOT NULL, created REAL NOT NULL)"
    )
    rows = [
        ("r1", None, '[{"role": "user", "content": "hello there"}]', 1.0),
        ("r2", "r1", '[{"role": "user", "content": "more"}]', 2.0),
        ("r3", "r2", '[{"role": "user", "content": "again"}]', 3.0),
    ]
    for rid, parent, inp, created in rows:
        db.execute(
            "INSERT INTO responses VALUES (?, ?, 'm', NULL, ?, '[]', ?)",
            (rid, parent, inp, created),
        )
    db.commit()
    db.close()
    store = ChatStore(path)
    [chat] = store.chats()
    assert (chat.id, chat.title, chat.turns, chat.head) == ("r1", "hello there", 3, "r3")
    # Deleting a middle turn keeps the later turn's history whole.
    store.delete_response("r2")
    assert [m["content"] for m in store.conversation("r3").messages] == [
        "hello there",
        "more",
        "again",
    ]
    assert store.chat("r1")[0].turns == 2
