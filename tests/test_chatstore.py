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


def _turn(store, parent=None, text="x", size=0):
    return store.save(
        parent_id=parent,
        model="m",
        system=None,
        input=[user(text + "." * size)],
        output=[assistant("ok")],
    )


def _age(store, chat_id, days):
    """Backdate a chat as if it was last continued ``days`` ago."""
    import time

    with store._lock, store._db:
        store._db.execute(
            "UPDATE chats SET updated = ? WHERE id = ?", (time.time() - days * 86400, chat_id)
        )


def test_retention_by_age_deletes_old_chats_when_the_store_opens(tmp_path):
    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    old = _turn(store, text="old")
    old_two = _turn(store, old, text="old again")
    recent = _turn(store, text="recent")
    _age(store, old, 10)
    store.close()
    store = ChatStore(path, max_age_days=7)
    assert [c.id for c in store.chats()] == [recent]
    with pytest.raises(ResponseNotFound):
        store.get(old_two)
    store.close()


def test_retention_by_size_deletes_the_least_recently_continued_first(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3", max_bytes=2500, prune_interval=0)
    first = _turn(store, text="first", size=1000)
    second = _turn(store, text="second", size=1000)
    # Continuing the first chat makes the second the least recently continued.
    _turn(store, first, text="more", size=10)
    assert {c.id for c in store.chats()} == {first, second}
    third = _turn(store, text="third", size=1000)
    assert {c.id for c in store.chats()} == {first, third}
    store.close()


def test_retention_keeps_a_chat_a_request_is_continuing(tmp_path):
    import asyncio

    store = ChatStore(tmp_path / "chats.sqlite3", max_age_days=1, prune_interval=0)
    old = _turn(store, text="old")
    doomed = _turn(store, text="also old")
    _age(store, old, 5)
    _age(store, doomed, 5)

    async def continue_old():
        history = await store.aconversation(old)
        # Another request's save runs retention while this one is generating.
        _turn(store, text="someone else")
        assert {c.id for c in store.chats()} >= {old}
        assert doomed not in {c.id for c in store.chats()}
        await store.asave(parent_id=old, model="m", system=None, input=[user("next")], output=[])
        return history

    asyncio.run(continue_old())
    conversation = store.conversation(store.chat(old)[0].head)
    assert [m["content"] for m in conversation.messages] == ["old", "ok", "next"]
    # Once saved the pin is gone: the chat is kept now only because it was just continued.
    _age(store, old, 5)
    store.prune()
    assert old not in {c.id for c in store.chats()}
    store.close()


def test_close_waits_for_a_save_in_flight(tmp_path):
    import asyncio

    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)

    async def save_racing_close():
        pending = store.asave(parent_id=None, model="m", system=None, input=[user("q")], output=[])
        store.close()  # before the save's thread has even started
        return await pending

    saved = asyncio.run(save_racing_close())
    again = ChatStore(path)
    assert again.conversation(saved).messages == [user("q")]
    again.close()


def test_a_save_after_close_is_a_clear_error(tmp_path):
    import asyncio

    from mlxserve.core.chatstore import StoreClosed

    store = ChatStore(tmp_path / "chats.sqlite3")
    store.close()

    async def late():
        await store.asave(parent_id=None, model="m", system=None, input=[user("q")], output=[])

    with pytest.raises(StoreClosed) as e:
        asyncio.run(late())
    assert e.value.status == 503


def test_retention_settings_have_flags_and_environment_variables(monkeypatch):
    from mlxserve import cli
    from mlxserve.settings import Settings

    args, _ = cli.build_parser().parse_known_args(
        ["serve", "--chat-store-max-age-days", "30", "--chat-store-max-bytes", "1000000"]
    )
    settings = cli._settings(args)
    assert (settings.chat_store_max_age_days, settings.chat_store_max_bytes) == (30, 1_000_000)
    monkeypatch.setenv("MLXSERVE_CHAT_STORE_MAX_AGE_DAYS", "2.5")
    assert Settings().chat_store_max_age_days == 2.5
