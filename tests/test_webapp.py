"""The web app in a real browser: the system's Chromium driven by Playwright against a real
server (one browser, one server for both formats, shared by the tests; the last test restarts
it). Screenshots of the main screens go to ``.cache/screenshots`` (git-ignored)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from script_loader import load_script

from mlxserve.core.chatstore import ChatStore
from tests.conftest import GGUF_KEY, MLX_KEY, MODELS_CACHE, PUBLISHER, REPO, Server
from tests.hubserver import Hub, HubServer

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / ".cache" / "screenshots"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HUB_REPO = "hub-test/tiny-qwen2-mlx"
MODELS = [MLX_KEY, GGUF_KEY]
VL_GGUF_KEY = f"{PUBLISHER}/tiny-qwen2-vl-gguf"
PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
    "0000000c4944415408d763f8cfc0f01f0005000201e2212bc50000000049454e44ae426082"
)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not CHROMIUM.exists():
    pytest.skip(
        "Chromium is not installed (/usr/bin/chromium); ./scripts/setup installs it with apt",
        allow_module_level=True,
    )


def _vision_models() -> Path | None:
    """The tiny vision models (scripts/make_vision_models.py, cached like the others)."""
    import importlib.util

    if importlib.util.find_spec("mlx_vlm") is None or importlib.util.find_spec("PIL") is None:
        return None
    module = load_script("make_vision_models")
    root = MODELS_CACHE.parent / "vision-models"
    module.generate(root, publisher=PUBLISHER)
    return root


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield browser
        browser.close()


class Site:
    """The server under test, restartable on the same home and models."""

    def __init__(self, models: Path, home: Path, hub_url: str) -> None:
        self.models, self.home, self.hub_url = models, home, hub_url
        self.server = self._start()

    def _start(self) -> Server:
        old = os.environ.get("HF_ENDPOINT")
        os.environ["HF_ENDPOINT"] = self.hub_url
        try:
            return Server(self.models, self.home, "--no-auto-evict")
        finally:
            if old is None:
                os.environ.pop("HF_ENDPOINT")
            else:
                os.environ["HF_ENDPOINT"] = old

    @property
    def url(self) -> str:
        return self.server.url

    def restart(self) -> None:
        self.server.stop()
        self.server = self._start()


@pytest.fixture(scope="module")
def hub(models_root):
    hub = Hub()
    hub.add_repo(HUB_REPO, models_root / "mlxserve-test" / "tiny-qwen2-mlx", downloads=7)
    server = HubServer(hub)
    yield hub, server.url
    server.close()


@pytest.fixture(scope="module")
def site(models_root, hub, tmp_path_factory):
    # The two test models, hard-linked into a models directory the downloads may write to.
    models = tmp_path_factory.mktemp("models")
    for key in MODELS:
        shutil.copytree(models_root / key, models / key, copy_function=os.link)
    vision = _vision_models()
    if vision is not None:
        shutil.copytree(vision / VL_GGUF_KEY, models / VL_GGUF_KEY, copy_function=os.link)
    site = Site(models, tmp_path_factory.mktemp("home"), hub[1])
    yield site
    site.server.stop()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    remote: list[str] = []
    page.on("request", lambda r: remote.append(r.url) if not r.url.startswith(site.url) else None)
    yield page
    context.close()
    # Nothing from anywhere else (no CDN), and no script errors (CSP violations included).
    assert remote == []
    assert [e for e in errors if "401" not in e] == []


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def open_app(page, url: str, fragment: str = "#/chat") -> None:
    page.goto(f"{url}/{fragment}")
    page.wait_for_selector("#shell:not([hidden])")


def settings(page, **values: str) -> None:
    page.click("#toggle-settings")
    for name, value in values.items():
        page.fill(f"#set-{name}", value)
        page.dispatch_event(f"#set-{name}", "change")
    page.click("#toggle-settings")


WATCH = """() => {
  window.__states = [];
  new MutationObserver(() => {
    const b = document.querySelector('.msg.assistant.streaming .bubble');
    if (b && window.__states.at(-1) !== b.dataset.raw) window.__states.push(b.dataset.raw);
  }).observe(document.querySelector('#messages'), {subtree: true, childList: true, attributes: true});
}"""


def send(page, text: str) -> str:
    """Send ``text`` and wait for the reply; the reply's text as the model wrote it."""
    before = page.locator(".msg.assistant .regenerate").count()
    page.fill("#prompt", text)
    page.keyboard.press("Enter")
    page.wait_for_function(
        f"() => document.querySelectorAll('.msg.assistant .regenerate').length > {before}",
        timeout=120_000,
    )
    return page.locator(".msg.assistant .bubble").last.get_attribute("data-raw")


@pytest.mark.parametrize("key", MODELS)
def test_reply_streams_in_pieces_and_equals_the_api(page, site, key):
    open_app(page, site.url)
    page.select_option("#model-pick", key)
    settings(page, temperature="0", max="40")
    page.evaluate(WATCH)
    reply = send(page, "Tell me about the sea")
    states = page.evaluate("() => window.__states")
    middle = [s for s in states if s and s != reply]
    assert len(set(middle)) >= 2, states
    assert all(reply.startswith(s) for s in middle)
    api = httpx.post(
        site.url + "/api/v1/chat",
        json={"model": key, "input": "Tell me about the sea", "temperature": 0,
              "max_output_tokens": 40, "store": False},
        timeout=120,
    ).json()  # fmt: skip
    assert reply == api["output"][-1]["content"]
    stats = page.locator(".msg.assistant .stats").last.inner_text()
    assert "tok/s" in stats and "TTFT" in stats
    # Stored on the server: listed, titled by the first message.
    assert (
        page.locator("#chats li.active .chat-name").inner_text().startswith("Tell me about the sea")
    )
    if key == MLX_KEY:
        shot(page, "chat")


def test_edit_and_branch_then_regenerate(page, site):
    open_app(page, site.url)
    page.select_option("#model-pick", GGUF_KEY)
    settings(page, temperature="0", max="4")
    send(page, "One")
    send(page, "Two")
    chat_id = page.locator("#chats li.active").get_attribute("data-chat")
    page.locator(".msg.user").last.locator("button.edit").click()
    page.fill(".edit-box textarea", "Deux")
    page.click(".edit-box button.primary")
    page.locator(".msg.user .branch", has_text="2 / 2").wait_for()
    assert page.locator(".msg.user .bubble").last.inner_text() == "Deux"
    page.locator(".msg.user .branch button[title='Previous branch']").click()
    assert page.locator(".msg.user .bubble").last.inner_text() == "Two"
    regenerated = page.locator(".msg.assistant .regenerate").count()
    page.locator(".msg.assistant .regenerate").last.click()
    page.locator(".msg.user .branch", has_text="3 / 3").wait_for()
    assert page.locator(".msg.assistant .regenerate").count() == regenerated
    chat = httpx.get(f"{site.url}/api/v1/chats/{chat_id}").json()
    first = next(t for t in chat["responses"] if t["parent_id"] is None)
    branches = [t for t in chat["responses"] if t["parent_id"] == first["id"]]
    assert [t["input"][0]["content"] for t in branches] == ["Two", "Deux", "Two"]
    assert chat["turns"] == 4


def test_images_attach_to_a_vision_model(page, site, tmp_path):
    if not (site.models / VL_GGUF_KEY).exists():
        pytest.skip("the vision test models need mlx-vlm and Pillow")
    open_app(page, site.url)
    page.select_option("#model-pick", GGUF_KEY)
    assert page.locator("#attach").is_hidden()  # not a vision model
    page.select_option("#model-pick", VL_GGUF_KEY)
    settings(page, max="4")
    image = tmp_path / "dot.png"
    image.write_bytes(PNG_1PX)
    page.set_input_files("#attach-input", str(image))
    page.locator("#attachments .thumb img").wait_for()
    send(page, "What is this?")
    assert page.locator("#attachments").is_hidden()
    chat_id = page.locator("#chats li.active").get_attribute("data-chat")
    chat = httpx.get(f"{site.url}/api/v1/chats/{chat_id}").json()
    content = chat["responses"][0]["input"][0]["content"]
    assert [p["type"] for p in content] == ["text", "image"]
    # The stored turn shows that it carried an image.
    assert page.locator(".msg.user .thumbs .pill").count() == 1


def running(url: str) -> float:
    found = httpx.get(url + "/metrics", params={"format": "json"}).json()
    return sum(
        s["value"]
        for f in found["families"]
        for s in f["samples"]
        if s["name"] == "mlxserve_requests_running"
    )


@pytest.mark.parametrize("how", ["button", "escape"])
def test_stop_cancels_the_generation_on_the_server(page, site, how):
    open_app(page, site.url)
    page.select_option("#model-pick", MLX_KEY if how == "button" else GGUF_KEY)
    page.fill("#prompt", "Write forever")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => (document.querySelector('.msg.assistant.streaming .bubble')?.dataset.raw || '')"
        ".length > 20",
        timeout=120_000,
    )
    assert running(site.url) == 1
    if how == "button":
        page.click("#stop")
    else:
        page.keyboard.press("Escape")
    stopped = time.monotonic()
    while running(site.url) != 0:
        assert time.monotonic() - stopped < 1.0, "the generation went on after Stop"
        time.sleep(0.02)
    page.wait_for_selector("#send:not([hidden])")
    assert "Stopped" in page.locator(".msg.assistant .meta").last.inner_text()


def test_load_with_a_context_length_then_unload(page, site):
    open_app(page, site.url, "#/models")
    row = page.locator(f"tr[data-model='{GGUF_KEY}']")
    row.locator("button.load").click()
    page.fill("#load-form input[name=context_length]", "1536")
    page.fill("#load-form input[name=identifier]", "web-loaded")
    page.fill("#load-form input[name=parallel]", "2")
    assert page.locator("#load-form select[name=kv_cache_quantization]").is_hidden()
    page.select_option("#load-form select[name=cache_type_k]", "q8_0")
    page.click("#load-go")
    line = page.locator(".instance-line[data-instance='web-loaded']")
    line.wait_for()
    assert "context 1,536" in line.inner_text()
    models = httpx.get(site.url + "/api/v1/models").json()["models"]
    [entry] = [m for m in models if m["key"] == GGUF_KEY]
    loaded = {i["id"]: i["config"]["context_length"] for i in entry["loaded_instances"]}
    assert loaded["web-loaded"] == 1536
    [config] = [i["config"] for i in entry["loaded_instances"] if i["id"] == "web-loaded"]
    assert config["parallel"] == 2 and config["cache_type_k"] == "q8_0"
    shot(page, "models")
    line.locator("button.unload").click()
    line.wait_for(state="detached")
    models = httpx.get(site.url + "/api/v1/models").json()["models"]
    [entry] = [m for m in models if m["key"] == GGUF_KEY]
    assert "web-loaded" not in [i["id"] for i in entry["loaded_instances"]]


def test_search_download_with_progress_then_chat(page, site, hub):
    hub[0].throttle = 0.004  # about 16 MB/s: a few seconds for the 50 MB model
    try:
        open_app(page, site.url, "#/models")
        page.fill("#search-q", "tiny")
        page.click("#search-form button[type=submit]")
        result = page.locator(f".result[data-repo='{HUB_REPO}']")
        result.wait_for()
        assert "7 downloads" in result.inner_text()
        shot(page, "search")
        result.locator("button.download").click()
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # The job's element is redrawn twice a second: read it in one go.
            progress, state = page.evaluate(
                "() => { const d = document.querySelector('.download');"
                " return d ? [d.dataset.progress, d.className] : [null, ''] }"
            )
            if progress is not None:
                seen.add(progress)
            if "completed" in state:
                break
            time.sleep(0.05)
        moving = {p for p in seen if 0 < float(p) < 1}
        assert len(moving) >= 2, seen
        page.locator(".download.completed").wait_for()
        assert "Done" in page.locator(".download .detail").first.inner_text()
        page.locator(f"tr[data-model='{HUB_REPO}']").wait_for()
    finally:
        hub[0].throttle = 0
    page.click("a[data-tab=chat]")
    page.click("#new-chat")
    page.wait_for_function(
        f"() => [...document.querySelectorAll('#model-pick option')]"
        f".some(o => o.value === '{HUB_REPO}')"
    )
    page.select_option("#model-pick", HUB_REPO)
    settings(page, max="8")
    assert send(page, "Hello") != ""


def test_markup_in_a_reply_shows_as_text_and_runs_nothing(page, site):
    # A model that writes markup: its stored reply, rendered like any other.
    store = ChatStore(site.home / "chats.sqlite3")
    evil = (
        'Look: <script>window.__ran = 1</script> and <img src=x onerror="window.__ran = 2">'
        '\n\n[click](javascript:window.__ran=3) <b onmouseover="window.__ran = 4">b</b>'
    )
    chat_id = store.save(
        parent_id=None,
        model=MLX_KEY,
        system=None,
        input=[{"role": "user", "content": "Say something <i>odd</i>"}],
        output=[{"role": "assistant", "content": evil}],
    )
    store.close()
    open_app(page, site.url, f"#/chat/{chat_id}")
    bubble = page.locator(".msg.assistant .bubble").last
    bubble.wait_for()
    text = bubble.inner_text()
    assert "<script>window.__ran = 1</script>" in text
    assert '<img src=x onerror="window.__ran = 2">' in text
    assert page.locator(".msg.user .bubble").inner_text() == "Say something <i>odd</i>"
    assert page.locator("#messages script, #messages img, #messages [onerror]").count() == 0
    link = bubble.locator("a")
    assert link.count() == 0 or not (link.get_attribute("href") or "").startswith("javascript")
    bubble.hover()
    page.wait_for_timeout(200)
    assert page.evaluate("() => window.__ran") is None


def test_tool_calls_and_their_results_show_as_cards(page, site):
    store = ChatStore(site.home / "chats.sqlite3")
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "read_file", "arguments": {"path": "/tmp/<notes>.txt"}},
    }
    chat_id = store.save(
        parent_id=None, model=MLX_KEY, system=None,
        input=[{"role": "user", "content": "What do my notes say?"}],
        output=[
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "name": "read_file",
             "content": "<b>buy milk</b>"},
            {"role": "assistant", "content": "They say **buy milk**."},
        ],
    )  # fmt: skip
    store.close()
    open_app(page, site.url, f"#/chat/{chat_id}")
    card = page.locator(".msg.assistant details.tool")
    card.wait_for()
    assert "read_file" in card.locator("summary").inner_text()
    card.locator("summary").click()
    assert "/tmp/<notes>.txt" in card.locator(".tool-args").inner_text()
    assert card.locator(".tool-output").inner_text() == "<b>buy milk</b>"
    answer = page.locator(".msg.assistant .bubble")
    assert answer.inner_text() == "They say buy milk."
    assert answer.locator("strong").inner_text() == "buy milk"
    shot(page, "chat-tools")


def test_auth_shows_nothing_without_a_token_and_everything_with_one(browser, auth_server):
    srv, secret = auth_server
    assert "script-src 'self'" in httpx.get(srv.url + "/").headers["content-security-policy"]
    assert httpx.get(srv.url + "/api/v1/chats").status_code == 401
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    page = context.new_page()
    page.goto(srv.url + "/")
    page.wait_for_selector("#auth:not([hidden])")
    assert page.locator("#shell").is_hidden()
    assert page.locator("#chats li").count() == 0
    shot(page, "auth")
    page.fill("#auth-token", "sk-lm-wrongwron:wrongwrongwrongwrong")
    page.click("#auth-form button[type=submit]")
    page.wait_for_selector("#auth-error:not([hidden])")
    assert page.locator("#shell").is_hidden()
    page.fill("#auth-token", secret)
    page.click("#auth-form button[type=submit]")
    page.wait_for_selector("#shell:not([hidden])")
    page.wait_for_selector(
        "#model-pick option[value='mlxserve-test/tiny-qwen2-mlx']", state="attached"
    )
    # Kept for this tab only: the token is in sessionStorage, not localStorage.
    assert page.evaluate("() => sessionStorage.getItem('mlxserve.token')") == secret
    assert (
        page.evaluate(
            "() => Object.keys(localStorage).some(k => localStorage.getItem(k).includes('sk-lm-'))"
        )
        is False
    )
    page.click("a[data-tab=server]")
    page.locator("#tokens tr[data-token]").first.wait_for()
    page.fill(".token-form input", "made-in-browser")
    page.click(".token-form button")
    created = page.locator(".new-token").inner_text()
    assert created.startswith("sk-lm-")
    assert (
        httpx.get(
            srv.url + "/api/v1/models", headers={"Authorization": f"Bearer {created}"}
        ).status_code
        == 200
    )
    page.wait_for_timeout(2500)  # two metric samples for the charts
    shot(page, "server")
    page.on("dialog", lambda d: d.accept())
    row = page.locator("#tokens tr", has_text="made-in-browser")
    row.locator("button.revoke").click()
    row.wait_for(state="detached")
    assert (
        httpx.get(
            srv.url + "/api/v1/models", headers={"Authorization": f"Bearer {created}"}
        ).status_code
        == 401
    )
    context.close()


def test_phone_layout_in_dark_mode(browser, site):
    context = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark")
    page = context.new_page()
    open_app(page, site.url)
    assert page.locator("#chat-list").evaluate("e => e.getBoundingClientRect().right <= 0")
    page.click("#toggle-chats")
    page.wait_for_function(
        "() => document.querySelector('#chat-list').getBoundingClientRect().left >= 0"
    )
    shot(page, "phone-chats")
    page.click("#new-chat")
    page.wait_for_function(
        "() => document.querySelector('#chat-list').getBoundingClientRect().right <= 0"
    )
    page.fill("#prompt", "line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#prompt") == "line one\nline two"
    shot(page, "phone-chat")
    context.close()


def test_a_chat_survives_a_restart_and_continues(browser, site):
    before = httpx.get(site.url + "/api/v1/chats").json()["data"]
    chat = next(c for c in before if c["title"].startswith("Tell me about the sea"))
    site.restart()
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    page = context.new_page()
    open_app(page, site.url)
    page.locator(f"#chats li[data-chat='{chat['id']}'] .chat-name").click()
    page.locator(".msg.user .bubble", has_text="Tell me about the sea").wait_for()
    settings(page, max="8")
    send(page, "And then?")
    after = httpx.get(f"{site.url}/api/v1/chats/{chat['id']}").json()
    assert after["turns"] == chat["turns"] + 1
    head = next(t for t in after["responses"] if t["id"] == after["head_response_id"])
    assert head["parent_id"] == chat["head_response_id"]
    assert head["input"] == [{"role": "user", "content": "And then?"}]
    context.close()
