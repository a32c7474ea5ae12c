// Chat: stateful chats stored on the server (/api/v1/chat with store, /api/v1/chats), streamed
// replies with time to first token and tokens per second, Stop (and Esc) cancelling on the
// server, reasoning folded, tool calls shown, regenerate and edit-and-branch.
import { api, stream } from "/app/api.js";
import { renderMarkdown } from "/app/markdown.js";
import { $, ago, el, toast } from "/app/ui.js";

const SETTINGS_PREFIX = "mlxserve.chat.";
const MODEL_KEY = "mlxserve.model";

function textOf(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content.map((part) => (typeof part === "string" ? part : part.text || part.content || "")).join("");
  }
  return content ? String(content) : "";
}

function number(input) {
  const value = input.value.trim();
  return value === "" ? undefined : Number(value);
}

export class ChatView {
  constructor() {
    this.models = [];
    this.chats = [];
    this.chatId = null;
    this.turns = new Map();
    this.head = null;
    this.stats = new Map();
    this.running = null;
    this.ready = false;
    // Images to send with the next message: {url (data URL), name}.
    this.images = [];
    this.bind();
  }

  bind() {
    $("#composer").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send($("#prompt").value);
    });
    $("#prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.send($("#prompt").value);
      }
    });
    $("#prompt").addEventListener("input", () => this.grow());
    $("#stop").addEventListener("click", () => this.stop());
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && this.running) {
        event.preventDefault();
        this.stop();
      }
    });
    $("#new-chat").addEventListener("click", () => this.open(null));
    $("#toggle-settings").addEventListener("click", () => {
      $("#settings").hidden = !$("#settings").hidden;
    });
    $("#toggle-chats").addEventListener("click", (event) => {
      event.stopPropagation();
      $("#chat-list").classList.toggle("open");
    });
    // On a phone the list slides over the conversation: a tap beside it closes it.
    document.querySelector(".conversation").addEventListener("click", () => $("#chat-list").classList.remove("open"));
    $("#model-pick").addEventListener("change", () => {
      localStorage.setItem(MODEL_KEY, $("#model-pick").value);
      this.visionControls();
    });
    $("#attach").addEventListener("click", () => $("#attach-input").click());
    $("#attach-input").addEventListener("change", () => this.attach($("#attach-input").files));
    for (const id of ["#set-system", "#set-temperature", "#set-top-p", "#set-top-k", "#set-max", "#set-reasoning", "#set-mcp"]) {
      $(id).addEventListener("change", () => this.saveSettings());
    }
  }

  async enter() {
    await Promise.all([this.loadModels(), this.loadChats()]);
    if (!this.ready) {
      this.ready = true;
      const wanted = location.hash.split("/")[2];
      await this.open(wanted ? decodeURIComponent(wanted) : null);
    }
    $("#prompt").focus();
  }

  leave() {}

  grow() {
    const box = $("#prompt");
    box.style.height = "auto";
    box.style.height = `${Math.min(box.scrollHeight, window.innerHeight * 0.4)}px`;
  }

  // --- models -----------------------------------------------------------------------------

  async loadModels() {
    const { models } = await api("/api/v1/models");
    this.models = models.filter((m) => m.type === "llm");
    const pick = $("#model-pick");
    const before = pick.value || localStorage.getItem(MODEL_KEY);
    pick.replaceChildren();
    if (!this.models.length) {
      pick.append(el("option", { value: "", text: "No models yet: get one under Models" }));
      return;
    }
    const loaded = this.models.filter((m) => m.loaded_instances.length);
    const rest = this.models.filter((m) => !m.loaded_instances.length);
    const group = (label, list) =>
      el("optgroup", { label }, list.map((m) => el("option", { value: m.key, text: `${m.loaded_instances.length ? "● " : ""}${m.display_name || m.key}` })));
    if (loaded.length) pick.append(group("Loaded", loaded));
    if (rest.length) pick.append(group("Downloaded", rest));
    const keys = this.models.map((m) => m.key);
    pick.value = keys.includes(before) ? before : (loaded[0] || this.models[0]).key;
    this.visionControls();
  }

  // --- images (vision models) ---------------------------------------------------------------

  visionControls() {
    const model = this.models.find((m) => m.key === $("#model-pick").value);
    const vision = !!model?.capabilities?.vision;
    $("#attach").hidden = !vision;
    if (!vision && this.images.length) {
      this.images = [];
      this.renderAttachments();
    }
  }

  attach(files) {
    for (const file of files) {
      const reader = new FileReader();
      reader.onload = () => {
        this.images.push({ url: reader.result, name: file.name });
        this.renderAttachments();
      };
      reader.readAsDataURL(file);
    }
    $("#attach-input").value = "";
  }

  renderAttachments() {
    const box = $("#attachments");
    box.hidden = !this.images.length;
    box.replaceChildren(
      ...this.images.map((image, i) =>
        el(
          "div",
          { class: "thumb" },
          el("img", { src: image.url, alt: image.name }),
          el("button", { type: "button", title: "Remove", onclick: () => {
            this.images.splice(i, 1);
            this.renderAttachments();
          } }, "×"),
        ),
      ),
    );
  }

  // --- chats list -------------------------------------------------------------------------

  async loadChats() {
    const { data } = await api("/api/v1/chats");
    this.chats = data;
    this.renderChats();
  }

  renderChats() {
    const list = $("#chats");
    list.replaceChildren(
      ...this.chats.map((chat) =>
        el(
          "li",
          { class: chat.id === this.chatId ? "active" : "", dataset: { chat: chat.id } },
          el("button", { class: "chat-name", title: chat.title, onclick: () => this.open(chat.id) }, el("span", { class: "chat-text", text: chat.title }), el("span", { class: "chat-when", text: ago(chat.updated_at) })),
          el(
            "span",
            { class: "row-actions" },
            el("button", { title: "Rename", class: "rename", onclick: () => this.rename(chat) }, "Rename"),
            el("button", { title: "Delete", class: "delete", onclick: () => this.remove(chat) }, "Delete"),
          ),
        ),
      ),
    );
    if (!this.chats.length) list.append(el("li", { class: "muted" }, "No chats yet."));
  }

  async rename(chat) {
    const title = prompt("Rename chat", chat.title);
    if (!title || !title.trim()) return;
    try {
      await api(`/api/v1/chats/${encodeURIComponent(chat.id)}`, { method: "PATCH", body: { title } });
      await this.loadChats();
      if (chat.id === this.chatId) this.renderTitle();
    } catch (error) {
      toast(error.message, true);
    }
  }

  async remove(chat) {
    if (!confirm(`Delete "${chat.title}"? This cannot be undone.`)) return;
    try {
      await api(`/api/v1/chats/${encodeURIComponent(chat.id)}`, { method: "DELETE" });
      localStorage.removeItem(SETTINGS_PREFIX + chat.id);
      if (chat.id === this.chatId) await this.open(null);
      await this.loadChats();
    } catch (error) {
      toast(error.message, true);
    }
  }

  // --- one chat ---------------------------------------------------------------------------

  async open(chatId) {
    if (this.running) this.stop();
    $("#chat-list").classList.remove("open");
    this.chatId = chatId;
    this.turns = new Map();
    this.head = null;
    if (chatId) {
      try {
        const chat = await api(`/api/v1/chats/${encodeURIComponent(chatId)}`);
        for (const turn of chat.responses) this.turns.set(turn.id, turn);
        this.head = chat.head_response_id;
        if (this.models.some((m) => m.key === chat.model)) $("#model-pick").value = chat.model;
      } catch (error) {
        toast(error.message, true);
        this.chatId = null;
      }
    }
    history.replaceState(null, "", this.chatId ? `#/chat/${encodeURIComponent(this.chatId)}` : "#/chat");
    this.loadSettings();
    this.renderChats();
    this.renderTitle();
    this.render();
  }

  renderTitle() {
    const chat = this.chats.find((c) => c.id === this.chatId);
    $("#chat-title").textContent = chat ? chat.title : "New chat";
  }

  path() {
    const out = [];
    let id = this.head;
    while (id && this.turns.has(id) && out.length < 10000) {
      out.unshift(this.turns.get(id));
      id = this.turns.get(id).parent_id;
    }
    return out;
  }

  siblings(turn) {
    return [...this.turns.values()].filter((t) => t.parent_id === turn.parent_id).sort((a, b) => a.created_at - b.created_at);
  }

  // The newest leaf under a turn: where switching to that branch lands.
  leafOf(turn) {
    let current = turn;
    for (;;) {
      const kids = [...this.turns.values()].filter((t) => t.parent_id === current.id);
      if (!kids.length) return current;
      current = kids.sort((a, b) => b.created_at - a.created_at)[0];
    }
  }

  render() {
    const box = $("#messages");
    const path = this.path();
    box.replaceChildren();
    if (!path.length) {
      box.append($("#empty") || this.emptyState());
      $("#empty").hidden = false;
      return;
    }
    for (const turn of path) {
      for (const message of turn.input) {
        if (message.role !== "user") continue;
        const parts = Array.isArray(message.content) ? message.content : [];
        const images = parts.filter((p) => p && p.type === "image").map(() => null);
        box.append(this.userMessage(turn, textOf(message.content), images));
      }
      box.append(this.assistantMessage(turn));
    }
    box.scrollTop = box.scrollHeight;
  }

  emptyState() {
    return el(
      "div",
      { id: "empty", class: "empty" },
      el("img", { src: "/app/icon.svg", alt: "" }),
      el("h2", { text: "What can I help with?" }),
      el("p", { text: "Pick a model and start typing. Chats are stored on this server." }),
    );
  }

  userMessage(turn, text, images = []) {
    const bubble = el("div", { class: "bubble", text });
    const meta = el("div", { class: "meta" });
    const node = el("div", { class: "msg user" });
    if (images.length) node.append(el("div", { class: "thumbs" }, images.map((src) => (src ? el("img", { src, alt: "image" }) : el("span", { class: "pill", text: "image" })))));
    node.append(bubble, meta);
    if (turn) {
      const sibs = this.siblings(turn);
      if (sibs.length > 1) {
        const at = sibs.findIndex((t) => t.id === turn.id);
        const go = (i) => {
          this.head = this.leafOf(sibs[i]).id;
          this.render();
        };
        meta.append(
          el(
            "span",
            { class: "branch" },
            el("button", { title: "Previous branch", disabled: at === 0, onclick: () => go(at - 1) }, "‹"),
            `${at + 1} / ${sibs.length}`,
            el("button", { title: "Next branch", disabled: at === sibs.length - 1, onclick: () => go(at + 1) }, "›"),
          ),
        );
      }
      meta.append(el("button", { class: "edit", title: "Edit and send as a new branch", onclick: () => this.edit(node, turn, text) }, "Edit"));
    }
    return node;
  }

  edit(node, turn, text) {
    if (this.running) return;
    const area = el("textarea", { rows: 3 });
    area.value = text;
    const box = el(
      "div",
      { class: "edit-box" },
      area,
      el(
        "div",
        {},
        el("button", { class: "ghost", type: "button", onclick: () => this.render() }, "Cancel"),
        el("button", { class: "primary", type: "button", onclick: () => this.send(area.value, turn.parent_id, true) }, "Send"),
      ),
    );
    node.replaceChildren(box);
    area.focus();
  }

  assistantMessage(turn) {
    const node = el("div", { class: "msg assistant", dataset: { response: turn.id } });
    let text = "";
    const cards = new Map();
    for (const message of turn.output) {
      if (message.role === "assistant" && message.tool_calls) {
        for (const call of message.tool_calls) {
          const fn = call.function || call;
          const card = this.toolCard(fn.name, fn.arguments, null);
          cards.set(call.id, card);
          node.append(card);
        }
      } else if (message.role === "tool") {
        const card = cards.get(message.tool_call_id) || [...cards.values()].pop();
        if (card) this.toolResult(card, textOf(message.content), false);
      } else if (message.role === "assistant") {
        text += textOf(message.content);
      }
    }
    const bubble = el("div", { class: "bubble md" });
    bubble.dataset.raw = text;
    renderMarkdown(bubble, text);
    node.append(bubble, this.assistantMeta(turn, this.stats.get(turn.id)));
    return node;
  }

  assistantMeta(turn, stats) {
    const meta = el("div", { class: "meta" });
    if (stats) meta.append(el("span", { class: "stats", text: stats }));
    if (turn) {
      meta.append(
        el("button", { class: "copy", onclick: () => navigator.clipboard?.writeText(node_text(turn)) }, "Copy"),
        el("button", { class: "regenerate", title: "Regenerate", onclick: () => this.regenerate(turn) }, "Regenerate"),
      );
    }
    return meta;
  }

  toolCard(name, args, provider) {
    const shown = typeof args === "string" ? args : JSON.stringify(args, null, 2);
    const label = provider && provider.plugin_id ? ` · ${provider.plugin_id}` : "";
    return el("details", { class: "tool" }, el("summary", { text: `Tool call: ${name}${label}` }), el("pre", { class: "tool-args", text: shown || "{}" }));
  }

  toolResult(card, output, failed) {
    card.classList.toggle("failed", failed);
    card.append(el("div", { class: "muted", text: failed ? "Failed" : "Result" }), el("pre", { class: "tool-output", text: output }));
  }

  regenerate(turn) {
    const input = turn.input.filter((m) => m.role === "user").map((m) => textOf(m.content)).join("\n");
    this.send(input, turn.parent_id, true);
  }

  // --- settings per chat --------------------------------------------------------------------

  settingsKey() {
    return SETTINGS_PREFIX + (this.chatId || "draft");
  }

  loadSettings() {
    let saved = {};
    try {
      saved = JSON.parse(localStorage.getItem(this.settingsKey()) || "{}");
    } catch {
      saved = {};
    }
    const system = this.path().map((t) => t.system).filter(Boolean).pop();
    $("#set-system").value = saved.system ?? system ?? "";
    $("#set-temperature").value = saved.temperature ?? "";
    $("#set-top-p").value = saved.top_p ?? "";
    $("#set-top-k").value = saved.top_k ?? "";
    $("#set-max").value = saved.max ?? "";
    $("#set-reasoning").value = saved.reasoning ?? "";
    $("#set-mcp").value = saved.mcp ?? "";
  }

  saveSettings() {
    const settings = {
      system: $("#set-system").value,
      temperature: $("#set-temperature").value,
      top_p: $("#set-top-p").value,
      top_k: $("#set-top-k").value,
      max: $("#set-max").value,
      reasoning: $("#set-reasoning").value,
      mcp: $("#set-mcp").value,
    };
    localStorage.setItem(this.settingsKey(), JSON.stringify(settings));
  }

  requestBody(text, previous) {
    const images = this.images.map((image) => ({ type: "image", data_url: image.url }));
    const input = images.length ? [{ type: "text", content: text }, ...images] : text;
    const body = { model: $("#model-pick").value, input, stream: true, store: true };
    if (previous) body.previous_response_id = previous;
    const system = $("#set-system").value.trim();
    if (system) body.system_prompt = system;
    const temperature = number($("#set-temperature"));
    if (temperature !== undefined) body.temperature = temperature;
    const topP = number($("#set-top-p"));
    if (topP !== undefined) body.top_p = topP;
    const topK = number($("#set-top-k"));
    if (topK !== undefined) body.top_k = topK;
    const max = number($("#set-max"));
    if (max !== undefined) body.max_output_tokens = max;
    const reasoning = $("#set-reasoning").value;
    if (reasoning) body.reasoning = reasoning;
    const servers = $("#set-mcp").value.split(",").map((s) => s.trim()).filter(Boolean);
    if (servers.length) body.integrations = servers.map((name) => ({ type: "plugin", id: `mcp/${name}` }));
    return body;
  }

  // --- sending and streaming ------------------------------------------------------------------

  setRunning(running) {
    this.running = running;
    $("#send").hidden = !!running;
    $("#stop").hidden = !running;
  }

  stop() {
    if (!this.running) return;
    this.running.stopped = true;
    this.running.controller.abort();
  }

  async send(raw, parent = undefined, branch = false) {
    const text = (raw || "").trim();
    if (!text || this.running) return;
    if (!$("#model-pick").value) {
      toast("Download a model first (Models).", true);
      return;
    }
    const previous = branch ? parent : this.head;
    // A first turn edited or regenerated starts a chat of its own (a chat grows from one turn).
    if (!previous) this.chatId = null;
    if (!branch) {
      $("#prompt").value = "";
      this.grow();
    }
    this.saveSettings();
    // Show the branch being continued, then the new turn under it.
    this.head = previous || null;
    this.render();
    $("#empty")?.remove();
    const box = $("#messages");
    box.append(this.userMessage(null, text, this.images.map((image) => image.url)));
    const node = el("div", { class: "msg assistant streaming" });
    const status = el("div", { class: "meta live", text: "Waiting for the model…" });
    const bubble = el("div", { class: "bubble md cursor" });
    node.append(bubble, status);
    box.append(node);
    box.scrollTop = box.scrollHeight;

    const body = this.requestBody(text, previous);
    this.images = [];
    this.renderAttachments();
    const run = { controller: new AbortController(), stopped: false };
    this.setRunning(run);
    const started = performance.now();
    let first = 0;
    let pieces = 0;
    let answer = "";
    let reasoning = null;
    let reasoningText = "";
    let reasoningStarted = 0;
    let card = null;
    let frame = 0;
    let result = null;
    const paint = () => {
      frame = 0;
      bubble.dataset.raw = answer;
      renderMarkdown(bubble, answer);
      const seconds = (performance.now() - first) / 1000;
      const rate = seconds > 0.05 ? (pieces / seconds).toFixed(1) : "–";
      const live = `TTFT ${((first - started) / 1000).toFixed(2)}s · ${rate} tok/s`;
      status.textContent = live;
      $("#live-stats").textContent = live;
      const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 120;
      if (nearBottom) box.scrollTop = box.scrollHeight;
    };
    const firstPiece = () => {
      if (!first) first = performance.now();
      pieces += 1;
    };
    try {
      await stream("/api/v1/chat", {
        body,
        signal: run.controller.signal,
        onEvent: (name, data) => {
          if (name === "model_load.start") status.textContent = "Loading the model…";
          else if (name === "model_load.progress") status.textContent = `Loading the model… ${Math.round((data.progress || 0) * 100)}%`;
          else if (name === "prompt_processing.progress") status.textContent = `Reading the prompt… ${Math.round((data.progress || 0) * 100)}%`;
          else if (name === "reasoning.start") {
            reasoningStarted = performance.now();
            reasoning = el("details", { class: "reasoning" }, el("summary", { text: "Thinking…" }), el("div", { class: "reasoning-text" }));
            node.insertBefore(reasoning, bubble);
          } else if (name === "reasoning.delta") {
            firstPiece();
            reasoningText += data.content || "";
            reasoning.querySelector(".reasoning-text").textContent = reasoningText;
            if (!frame) frame = requestAnimationFrame(paint);
          } else if (name === "reasoning.end" && reasoning) {
            reasoning.querySelector("summary").textContent = `Thought for ${((performance.now() - reasoningStarted) / 1000).toFixed(1)}s`;
          } else if (name === "message.delta") {
            firstPiece();
            answer += data.content || "";
            if (!frame) frame = requestAnimationFrame(paint);
          } else if (name === "tool_call.start") {
            card = this.toolCard(data.tool, "…", data.provider_info);
            node.insertBefore(card, bubble);
          } else if (name === "tool_call.arguments" && card) {
            card.querySelector(".tool-args").textContent = JSON.stringify(data.arguments, null, 2);
          } else if (name === "tool_call.success" && card) {
            this.toolResult(card, textOf(data.output), false);
          } else if (name === "tool_call.failure") {
            if (!card) card = node.insertBefore(this.toolCard(data.metadata?.tool_name || "tool", data.metadata?.arguments || {}, null), bubble);
            this.toolResult(card, data.reason || "failed", true);
          } else if (name === "error") {
            throw new Error(data.error?.message || "The generation failed.");
          } else if (name === "chat.end") {
            result = data.result;
          }
        },
      });
    } catch (error) {
      if (!run.stopped) {
        status.textContent = error.message;
        status.classList.add("error");
        toast(error.message, true);
      }
    } finally {
      if (frame) cancelAnimationFrame(frame);
      paint();
      bubble.classList.remove("cursor");
      node.classList.remove("streaming");
      this.setRunning(null);
    }
    if (run.stopped) {
      status.textContent = `Stopped · ${status.textContent}`;
      return;
    }
    if (!result) return;
    const s = result.stats || {};
    const line = `${s.total_output_tokens ?? pieces} tokens · ${(s.tokens_per_second ?? 0).toFixed(1)} tok/s · TTFT ${(s.time_to_first_token_seconds ?? 0).toFixed(2)}s`;
    $("#live-stats").textContent = line;
    if (!result.response_id) return;
    this.stats.set(result.response_id, line);
    const newChat = !this.chatId;
    await this.reload(newChat ? result.response_id : this.chatId, result.response_id);
  }

  async reload(chatId, head) {
    const chat = await api(`/api/v1/chats/${encodeURIComponent(chatId)}`);
    if (!this.chatId) {
      const draft = localStorage.getItem(SETTINGS_PREFIX + "draft");
      if (draft) localStorage.setItem(SETTINGS_PREFIX + chat.id, draft);
      localStorage.removeItem(SETTINGS_PREFIX + "draft");
    }
    this.chatId = chat.id;
    this.turns = new Map(chat.responses.map((t) => [t.id, t]));
    this.head = head;
    history.replaceState(null, "", `#/chat/${encodeURIComponent(chat.id)}`);
    this.render();
    await this.loadChats();
    this.renderTitle();
    this.loadModels();
  }
}

function node_text(turn) {
  return turn.output.filter((m) => m.role === "assistant").map((m) => textOf(m.content)).join("");
}
