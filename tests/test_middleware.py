"""The middleware's pieces on their own: host names, origins, tokens presented, the store."""

import json
import os

import pytest

from mlxserve.auth import TOKEN_PATTERN, TokenStore
from mlxserve.http.middleware import (
    HostGuardMiddleware,
    OriginPolicy,
    binds_loopback,
    host_name,
    origin_is_local,
    presented_tokens,
)
from mlxserve.settings import Settings


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:1234", "localhost"),
        ("LOCALHOST", "localhost"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]:1234", "::1"),
        ("[::1]", "::1"),
        ("localhost.:1234", "localhost"),
        ("evil.example:1234", "evil.example"),
        ("[::1", ""),
    ],
)
def test_host_name(header, name):
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("bind", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("127.0.0.2", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("myhost", False),
    ],
)
def test_binds_loopback(bind, loopback):
    assert binds_loopback(bind) is loopback


def _guard(tmp_path, **settings):
    return HostGuardMiddleware(lambda s, r, w: None, Settings(home=tmp_path, **settings))


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:1234",
        "127.0.0.1",
        "127.0.0.1:1234",
        "127.1.2.3:9",
        "[::1]:1234",
        "foo.localhost:1234",
        "a.b.localhost",
    ],
)
def test_loopback_hosts_pass(tmp_path, host):
    assert _guard(tmp_path).host_allowed(host)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:1234",
        "localhost.evil.com",
        "127.0.0.1.nip.io",
        "localhost@evil.example",
        "",
        "192.168.1.5",
        "0.0.0.0",
        "[::ffff:1.2.3.4]",
    ],
)
def test_foreign_hosts_are_refused(tmp_path, host):
    assert not _guard(tmp_path).host_allowed(host)


def test_extra_allowed_hosts(tmp_path):
    guard = _guard(tmp_path, allowed_hosts="proxy.lan, *.corp.example")
    assert guard.host_allowed("proxy.lan:8080")
    assert guard.host_allowed("api.corp.example")
    assert not guard.host_allowed("corp.example.evil.com")
    assert not guard.host_allowed("other.lan")


def test_the_machine_hostname_passes(tmp_path):
    guard = _guard(tmp_path)
    assert guard.host_allowed(guard.hostname + ":1234")


@pytest.mark.parametrize(
    ("origin", "local"),
    [
        ("http://localhost:5173", True),
        ("https://127.0.0.1", True),
        ("http://[::1]:3000", True),
        ("http://app.localhost", True),
        ("vscode-webview://abc", True),
        ("app://x", True),
        ("tauri://localhost", True),
        ("http://localhost.evil.com", False),
        ("https://evil.example", False),
        ("null", False),
        ("file://", False),
        ("http://[::1", False),
        ("ftp://localhost", False),
    ],
)
def test_origin_is_local(origin, local):
    assert origin_is_local(origin) is local


def test_origin_policy(tmp_path):
    off = OriginPolicy(Settings(home=tmp_path))
    assert off.allows("http://localhost:5173") and not off.allows("https://evil.example")
    star = OriginPolicy(Settings(home=tmp_path, cors=True))
    assert star.any_origin and star.allows("https://evil.example")
    listed = OriginPolicy(
        Settings(home=tmp_path, cors=True, cors_origins="https://app.example/, http://x.test")
    )
    assert listed.allows("https://app.example") and listed.allows("http://x.test")
    assert listed.allows("vscode-webview://x")
    assert not listed.allows("https://app.example.evil.com")
    assert not listed.allows("http://localhost.evil.com")


def _scope(path, headers):
    return {
        "type": "http",
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }


def test_presented_tokens():
    assert presented_tokens(_scope("/v1/models", {"Authorization": "Bearer abc"})) == ["abc"]
    assert presented_tokens(_scope("/v1/models", {"Authorization": "bearer  abc "})) == ["abc"]
    assert presented_tokens(_scope("/v1/models", {"Authorization": "Basic abc"})) == []
    assert presented_tokens(_scope("/v1/models", {"Authorization": "Bearer "})) == []
    assert presented_tokens(_scope("/v1/models", {"x-api-key": "k"})) == []
    assert presented_tokens(_scope("/v1/messages", {"x-api-key": "k"})) == ["k"]
    both = {"x-api-key": "k", "Authorization": "Bearer t"}
    assert presented_tokens(_scope("/v1/messages/count_tokens", both)) == ["t", "k"]


def test_token_store_round_trip(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    info, token = store.create("laptop")
    assert TOKEN_PATTERN.match(token), token
    assert store.verify(token)
    assert not store.verify(token + "x") and not store.verify("") and not store.verify("\ud800")
    client_id, passkey = token.removeprefix("sk-lm-").split(":")
    assert client_id == info.id
    assert store.verify_client(client_id, passkey)
    assert not store.verify_client(client_id, passkey[:-1] + ("1" if passkey[-1] == "0" else "0"))
    # only the hash is on disk, readable by the owner alone
    raw = (tmp_path / "tokens.json").read_text()
    assert token not in raw and passkey not in raw
    assert json.loads(raw)["tokens"][0]["name"] == "laptop"
    assert os.stat(tmp_path / "tokens.json").st_mode & 0o077 == 0
    assert [t.name for t in store.list()] == ["laptop"]
    # another process (the CLI) revoking it is seen by this one
    assert TokenStore(tmp_path / "tokens.json").revoke(info.id)
    assert not store.verify(token)
    assert not store.revoke(info.id)


def test_revoke_by_name(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    _, a = store.create("ci")
    _, b = store.create("laptop")
    assert store.revoke("ci")
    assert not store.verify(a) and store.verify(b)


def test_revoke_refuses_empty_and_shared_names(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    _, unnamed1 = store.create()
    _, unnamed2 = store.create()
    first, shared1 = store.create("ci")
    _, shared2 = store.create("ci")
    with pytest.raises(ValueError, match="Name the token"):
        store.revoke("")
    with pytest.raises(ValueError, match="2 tokens are named 'ci'.*by its id"):
        store.revoke("ci")
    assert all(store.verify(t) for t in (unnamed1, unnamed2, shared1, shared2))
    assert store.revoke(first.id)
    assert not store.verify(shared1) and store.verify(shared2)
    assert store.revoke("ci") and not store.verify(shared2)


def test_a_corrupt_store_refuses_everything(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    _, token = store.create("x")
    (tmp_path / "tokens.json").write_text("{not json")
    assert not store.verify(token)
