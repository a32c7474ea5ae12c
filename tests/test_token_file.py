"""A corrupt tokens.json is reported loudly, and ``serve --require-auth`` refuses to start
with it, instead of answering every request 401 without a word."""

from __future__ import annotations

import logging

import pytest
from starlette.testclient import TestClient

from mlxserve.app import create_app
from mlxserve.auth import CorruptTokenFile, TokenStore
from mlxserve.settings import Settings


@pytest.mark.parametrize("text", ["{not json", '{"tokens": 3}', "[1, 2]", "\xff\xfe"])
def test_a_corrupt_token_file_is_named(tmp_path, text):
    path = tmp_path / "tokens.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CorruptTokenFile, match="tokens.json"):
        TokenStore(path).check()


def test_an_empty_store_is_not_corrupt(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    store.check()
    (tmp_path / "tokens.json").write_text("{}")
    store.check()
    assert store.list() == []


def test_serving_with_auth_refuses_a_corrupt_token_file(tmp_path, caplog):
    (tmp_path / "tokens.json").write_text("{not json")
    app = create_app(Settings(home=tmp_path, models_dir=tmp_path, require_auth=True))
    with caplog.at_level(logging.ERROR), pytest.raises(CorruptTokenFile), TestClient(app):
        pass
    assert "refusing to start with --require-auth" in caplog.text


def test_a_token_file_corrupted_while_serving_is_logged_once(tmp_path, caplog):
    store = TokenStore(tmp_path / "tokens.json")
    _, token = store.create("t")
    app = create_app(Settings(home=tmp_path, models_dir=tmp_path, require_auth=True))
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as client:
        assert client.get("/v1/models", headers=headers).status_code == 200
        (tmp_path / "tokens.json").write_text("{broken")
        with caplog.at_level(logging.ERROR):
            for _ in range(3):
                assert client.get("/v1/models", headers=headers).status_code == 401
    assert caplog.text.count("THE API TOKEN FILE CANNOT BE READ") == 1
