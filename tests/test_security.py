"""Security at the HTTP edge, in process: DNS-rebinding host guard, Origin checks, CORS,
API tokens, body limit, hostile JSON and path-like model names (robustness.md S1-S6, S11,
V1, V4, L1)."""

import builtins
import logging
import os
import re
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from mlxserve.app import create_app
from mlxserve.auth import TokenStore
from mlxserve.http.middleware import OPEN_PATHS, OPEN_PREFIXES
from mlxserve.settings import Settings

# (method, path, json body): one route of each dialect, management routes included.
ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"model": "x", "messages": []}),
    ("POST", "/v1/messages", {"model": "x", "max_tokens": 1, "messages": []}),
    ("POST", "/v1/messages/count_tokens", {"model": "x", "messages": []}),
    ("POST", "/v1/responses", {"model": "x", "input": "hi"}),
    ("POST", "/v1/embeddings", {"model": "x", "input": "hi"}),
    ("GET", "/api/v0/models", None),
    ("POST", "/api/v0/chat/completions", {"model": "x", "messages": []}),
    ("GET", "/api/v1/models", None),
    ("POST", "/api/v1/models/load", {"model": "x"}),
    ("POST", "/api/v1/models/unload", {"instance_id": "x"}),
    ("POST", "/api/v1/chat", {"model": "x", "input": "hi"}),
]


def _app_routes() -> list[tuple[str, str, dict | None]]:
    """Every HTTP route the app has, path parameters filled in, minus the open ones: what
    must be refused without a token (or from a foreign host) before any handler runs."""
    from starlette.routing import Route

    out: list[tuple[str, str, dict | None]] = []
    for route in create_app().routes:
        if not isinstance(route, Route) or route.path in OPEN_PATHS:
            continue
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            out.append((method, path, {} if method in ("POST", "PUT", "PATCH") else None))
    return out


APP_ROUTES = _app_routes()
# The web app's static files answer without a token (they hold no data); the host guard
# still covers them.
AUTH_ROUTES = [r for r in APP_ROUTES if not r[1].startswith(OPEN_PREFIXES)]


def dialect(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/api/v1/"):
        return "lmstudio"
    return "openai"


def assert_error_shape(r, path: str, status: int, *, anthropic_type: str | None = None):
    assert r.status_code == status, r.text
    body = r.json()
    if dialect(path) == "anthropic":
        assert body["type"] == "error"
        assert set(body["error"]) >= {"type", "message"}
        if anthropic_type:
            assert body["error"]["type"] == anthropic_type
    elif dialect(path) == "lmstudio":
        assert set(body["error"]) >= {"type", "message"}
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
    return body


def make_client(tmp_path: Path, **settings) -> TestClient:
    root = tmp_path / "models"
    root.mkdir(exist_ok=True)
    app = create_app(Settings(home=tmp_path / "home", models_dir=root, **settings))
    # The connection arrives on a loopback address, as it does under a loopback bind.
    return TestClient(app, base_url="http://127.0.0.1:1234", raise_server_exceptions=False)


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


# --- S1/S2: DNS rebinding ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"), APP_ROUTES + [("GET", p, None) for p in sorted(OPEN_PATHS)]
)
def test_foreign_host_is_refused_on_every_route(client, method, path, body):
    r = client.request(method, path, json=body, headers={"Host": "evil.example:1234"})
    assert_error_shape(r, path, 403, anthropic_type="permission_error")


@pytest.mark.parametrize(
    "host", ["localhost:1234", "127.0.0.1:1234", "[::1]:1234", "foo.localhost"]
)
def test_loopback_hosts_reach_the_app(client, host):
    r = client.get("/v1/models", headers={"Host": host})
    assert r.status_code == 200


def test_network_bind_relaxes_the_host_guard(tmp_path):
    with make_client(tmp_path, host="0.0.0.0") as c:
        assert c.get("/v1/models", headers={"Host": "my-mac.lan:1234"}).status_code == 200


def test_network_bind_without_auth_warns_loudly(tmp_path, caplog):
    with (
        caplog.at_level(logging.WARNING, "mlxserve.security"),
        make_client(tmp_path, host="0.0.0.0"),
    ):
        pass
    assert "--require-auth" in caplog.text and "WITHOUT AUTHENTICATION" in caplog.text


@pytest.mark.parametrize(
    ("settings", "warns"),
    [
        ({"cors": True}, True),
        ({"cors": True, "require_auth": True}, False),
        ({"cors": True, "cors_origins": "https://app.example"}, False),
        ({}, False),
    ],
)
def test_cors_for_every_origin_without_auth_warns_loudly(tmp_path, caplog, settings, warns):
    with caplog.at_level(logging.WARNING, "mlxserve.security"), make_client(tmp_path, **settings):
        pass
    assert ("CORS IS OPEN TO EVERY WEB ORIGIN" in caplog.text) is warns


def test_extra_allowed_hosts(tmp_path):
    with make_client(tmp_path, allowed_hosts="proxy.lan") as c:
        assert c.get("/v1/models", headers={"Host": "proxy.lan"}).status_code == 200
        assert c.get("/v1/models", headers={"Host": "other.lan"}).status_code == 403


# --- S3/S10: Origin and CORS --------------------------------------------------------------


def test_cross_site_post_is_refused_without_cors(client):
    # A page on another site can POST text/plain without a preflight; it must not run.
    r = client.post(
        "/api/v1/models/load",
        content=b'{"model": "x"}',
        headers={"Origin": "https://evil.example", "Content-Type": "text/plain"},
    )
    assert_error_shape(r, "/api/v1/models/load", 403)
    assert "--cors" in r.json()["error"]["message"]


def test_cors_is_off_by_default(client):
    r = client.options(
        "/v1/chat/completions",
        headers={"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in r.headers
    r = client.get("/v1/models", headers={"Origin": "http://localhost:5173"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_any_origin_never_with_credentials(tmp_path):
    with make_client(tmp_path, cors=True) as c:
        r = c.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://evil.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "*"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-allow-headers"] == "authorization, content-type"
        assert "access-control-allow-credentials" not in r.headers
        r = c.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in r.headers


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:5173", True),
        ("http://localhost:8080", True),
        ("vscode-webview://x", True),
        ("app://x", True),
        ("https://chat.example", True),
        ("http://localhost.evil.com", False),
        ("https://chat.example.evil.com", False),
        ("null", False),
    ],
)
def test_cors_allow_list_echoes_only_allowed_origins(tmp_path, origin, allowed):
    with make_client(tmp_path, cors=True, cors_origins="https://chat.example") as c:
        r = c.options(
            "/v1/models", headers={"Origin": origin, "Access-Control-Request-Method": "GET"}
        )
        if allowed:
            assert r.status_code == 204
            assert r.headers["access-control-allow-origin"] == origin
            assert "origin" in r.headers["vary"].lower()
            got = c.get("/v1/models", headers={"Origin": origin})
            assert got.headers["access-control-allow-origin"] == origin
        else:
            assert r.status_code == 403
            assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-credentials" not in r.headers


def test_cors_preflight_needs_no_token(tmp_path):
    with make_client(tmp_path, cors=True, require_auth=True) as c:
        r = c.options(
            "/v1/chat/completions",
            headers={"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"},
        )
        assert r.status_code == 204
        r = c.get("/v1/models", headers={"Origin": "http://localhost:5173"})
        assert r.status_code == 401
        # the browser can read the 401
        assert r.headers["access-control-allow-origin"] == "*"


# --- S4/S11: API tokens -------------------------------------------------------------------


@pytest.fixture
def auth_client(tmp_path):
    with make_client(tmp_path, require_auth=True) as c:
        _, token = TokenStore(tmp_path / "home" / "tokens.json").create("test")
        c.token = token
        yield c


@pytest.mark.parametrize(("method", "path", "body"), AUTH_ROUTES)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer ", "Bearer wrong", "Basic dXNlcjpwYXNz", "sk-lm-abc"]
)
def test_missing_or_wrong_token_is_401_in_the_dialect(
    auth_client, method, path, body, authorization
):
    headers = {"Authorization": authorization} if authorization is not None else {}
    r = auth_client.request(method, path, json=body, headers=headers)
    assert_error_shape(r, path, 401, anthropic_type="authentication_error")
    assert r.headers["www-authenticate"] == "Bearer"
    if dialect(path) == "openai":
        assert r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_a_live_token_passes(auth_client, method, path, body):
    r = auth_client.request(
        method, path, json=body, headers={"Authorization": f"Bearer {auth_client.token}"}
    )
    assert r.status_code not in (401, 403), r.text


def test_every_hand_listed_route_is_an_app_route():
    assert {(m, p) for m, p, _ in ROUTES} <= {(m, p) for m, p, _ in APP_ROUTES}


@pytest.mark.parametrize("headers", [{"Host": "evil.example"}, {"Origin": "https://evil.example"}])
def test_websocket_from_a_foreign_host_or_origin_is_refused(client, headers):
    with (
        pytest.raises(WebSocketDisconnect) as exc,
        client.websocket_connect("ws://127.0.0.1:1234/llm", headers=headers),
    ):
        pass
    assert exc.value.code == 1008


def test_x_api_key_on_the_anthropic_routes_only(auth_client):
    key = {"x-api-key": auth_client.token}
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
    assert auth_client.post("/v1/messages/count_tokens", json=body, headers=key).status_code == 404
    assert auth_client.get("/v1/models", headers=key).status_code == 401


def test_health_stays_open(auth_client):
    r = auth_client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_health_tells_loaded_models_to_token_holders_only(auth_client):
    from mlxserve import __version__

    for authorization in (None, "Bearer wrong"):
        headers = {"Authorization": authorization} if authorization else {}
        body = auth_client.get("/health", headers=headers).json()
        assert body == {"status": "ok", "version": __version__}
    r = auth_client.get("/health", headers={"Authorization": f"Bearer {auth_client.token}"})
    assert r.status_code == 200 and r.json()["loaded"] == []


def test_revoked_token_is_refused_at_once(auth_client, tmp_path):
    headers = {"Authorization": f"Bearer {auth_client.token}"}
    assert auth_client.get("/v1/models", headers=headers).status_code == 200
    store = TokenStore(tmp_path / "home" / "tokens.json")
    assert store.revoke("test")
    assert auth_client.get("/v1/models", headers=headers).status_code == 401


def test_tokens_never_in_bodies_or_logs(auth_client, caplog):
    wrong = "sk-lm-AAAAAAAA:BBBBBBBBBBBBBBBBBBBB"
    with caplog.at_level(logging.DEBUG):
        for token in (wrong, auth_client.token):
            r = auth_client.post(
                "/v1/chat/completions",
                json={"model": "../../etc/passwd", "messages": []},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert token not in r.text
    assert wrong not in caplog.text and auth_client.token not in caplog.text
    passkey = auth_client.token.split(":")[1]
    assert passkey not in caplog.text


def test_a_refused_path_cannot_forge_log_lines(auth_client, caplog):
    with caplog.at_level(logging.INFO, "mlxserve.security"):
        r = auth_client.get(
            "/v1/models%0a2026-01-01 INFO forged", headers={"Authorization": "Bearer wrong"}
        )
    assert r.status_code == 401
    (message,) = [m for m in caplog.messages if "not valid" in m]
    assert "\n" not in message and "\\n" in message


def test_no_token_yet_warns(tmp_path, caplog):
    with (
        caplog.at_level(logging.WARNING, "mlxserve.security"),
        make_client(tmp_path, require_auth=True),
    ):
        pass
    assert "mlxserve token create" in caplog.text


def test_websocket_authorization_helper(tmp_path):
    from mlxserve.http.middleware import websocket_authorized

    app = create_app(Settings(home=tmp_path, models_dir=tmp_path, require_auth=True))
    state = app.state.mlxserve
    _, token = state.tokens.create("sdk")
    client_id, passkey = token.removeprefix("sk-lm-").split(":")
    scope = {"type": "websocket", "path": "/llm", "headers": []}
    assert websocket_authorized(scope, state, client_id, passkey)
    assert not websocket_authorized(scope, state, client_id, "x" * 20)
    assert not websocket_authorized(scope, state, "guest:123", "abc")
    bearer = {**scope, "headers": [(b"authorization", f"Bearer {token}".encode())]}
    assert websocket_authorized(bearer, state, "guest:1", "x")


# --- L1: body limit -----------------------------------------------------------------------

LIMIT = 64 * 1024


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/messages", "/api/v1/chat", "/api/v0/completions"]
)
def test_body_over_the_limit_is_413(tmp_path, path):
    with make_client(tmp_path, max_body_bytes=LIMIT) as c:
        big = b'{"model": "' + b"x" * (LIMIT + 10) + b'"}'
        r = c.post(path, content=big, headers={"Content-Type": "application/json"})
        assert_error_shape(r, path, 413, anthropic_type="request_too_large")

        def chunks():
            for _ in range(20):
                yield b"x" * 8192

        # chunked: no Content-Length to trust, counted as it arrives
        r = c.post(path, content=chunks())
        assert_error_shape(r, path, 413, anthropic_type="request_too_large")
        # just under the limit is read (and then judged on its content)
        r = c.post(path, content=b"x" * (LIMIT - 1))
        assert r.status_code == 400


# --- V1/V4 and hostile JSON ----------------------------------------------------------------

HOSTILE = [
    b'{"model":',
    b"[]",
    b'"x"',
    b"null",
    b"",
    b'{"model": 1' + b"0" * 5000 + b"}",
    b'{"model": "x", "temperature": NaN}',
    b'{"model": "x", "temperature": -Infinity}',
    b'{"model": "x", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"model": "x", "extra": ' + b'{"a":' * 100 + b"1" + b"}" * 100 + b"}",
    b'{"model": "\\ud800", "messages": []}',
    b'{"model": "x", "messages": "\xff\xfe"}',
    b'{"model": "x\\u0000y", "messages": [{"role": "user", "content": "a\\u0000b"}]}',
]


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/messages", "/api/v1/chat", "/v1/embeddings"]
)
@pytest.mark.parametrize("body", HOSTILE)
def test_hostile_json_is_a_clean_4xx(client, path, body):
    r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert_error_shape(r, path, r.status_code)


# --- S5/S6: path-like model names --------------------------------------------------------

PATHS = [
    "../../x",
    "..%2F..%2Fx",
    "/etc/passwd",
    "/etc/hosts",
    "a/../../b",
    "..\\x",
    "..",
    "someorg/unknown-repo",
    "models/../../../etc/passwd",
    "~/x",
    "C:\\Windows\\win.ini",
    "a" * 5000,
]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("model", PATHS)
def test_path_like_model_names_never_reach_the_filesystem(tmp_path, model, monkeypatch):
    with make_client(tmp_path) as c:
        registry = c.app.state.mlxserve.registry
        before = _tree(tmp_path)
        touched: list[str] = []

        def spy(real):
            def call(path=".", *args, **kwargs):
                touched.append(str(path))
                return real(path, *args, **kwargs)

            return call

        for name in ("stat", "lstat", "listdir", "scandir", "open"):
            monkeypatch.setattr(os, name, spy(getattr(os, name)))
        monkeypatch.setattr(builtins, "open", spy(builtins.open))
        requests = [
            (
                "/v1/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": "x"}]},
            ),
            (
                "/v1/messages",
                {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]},
            ),
            ("/v1/embeddings", {"model": model, "input": "x"}),
            ("/api/v1/chat", {"model": model, "input": "x"}),
            ("/api/v1/models/load", {"model": model}),
        ]
        for path, body in requests:
            r = c.post(path, json=body)
            assert r.status_code in (400, 404), (path, r.text)
            # neither the path nor where models live is echoed
            assert "/etc" not in r.text and str(tmp_path) not in r.text, r.text
            if model not in ("someorg/unknown-repo", ".."):  # a plain key may be named
                assert model not in r.text, r.text
        for path in (f"/v1/models/{model}", f"/api/v0/models/{model}"):
            r = c.get(path)
            assert r.status_code == 404 and "/etc" not in r.text
        assert not [p for p in touched if not p.startswith(str(tmp_path))], touched
        # the spy sees filesystem calls: listing models scans the models folder
        assert c.get("/v1/models").status_code == 200 and touched
        monkeypatch.undo()
        assert registry.get(model) is None
        assert _tree(tmp_path) == before
