// Server: charts drawn from GET /metrics?format=json (sampled every 2 s while shown, the last
// 10 minutes kept in the tab), loaded instances, the live log stream, and API tokens.
import uPlot from "/app/vendor/uPlot.esm.js";
import { api, ApiError, stream, token } from "/app/api.js";
import { $, bytes, count, duration, el, toast } from "/app/ui.js";

const SAMPLE_MS = 2000;
const KEEP = 300;
// The app's own polling: left out of the log view.
const QUIET = [/^\/metrics$/, /^\/api\/v1\/models\/loaded$/, /^\/api\/v1\/models\/download\/status\//, /^\/api\/v1\/logs\/stream$/];

function sum(families, name, filter = () => true) {
  const family = families.find((f) => f.samples.some((s) => s.name === name));
  if (!family) return 0;
  return family.samples.filter((s) => s.name === name && filter(s.labels)).reduce((n, s) => n + s.value, 0);
}

function byModel(families, name) {
  const out = {};
  for (const family of families) {
    for (const s of family.samples) if (s.name === name) out[s.labels.model] = s.value;
  }
  return out;
}

export class ServerView {
  constructor() {
    this.series = { t: [], tps: [], mem: [], models: [], rps: [], running: [] };
    this.last = null;
    this.charts = {};
    this.timer = 0;
    this.logAbort = null;
    $("#log-clear").addEventListener("click", () => $("#log").replaceChildren());
  }

  async enter() {
    await this.sample();
    this.loop();
    this.followLog();
    this.renderTokens();
  }

  leave() {
    clearTimeout(this.timer);
    this.timer = 0;
    this.logAbort?.abort();
    this.logAbort = null;
  }

  loop() {
    clearTimeout(this.timer);
    this.timer = setTimeout(async () => {
      if ($("#view-server").hidden) return;
      await this.sample().catch(() => {});
      this.loop();
    }, SAMPLE_MS);
  }

  async sample() {
    const [metrics, loaded] = await Promise.all([api("/metrics?format=json"), api("/api/v1/models/loaded")]);
    const f = metrics.families;
    const now = metrics.time;
    const generated = sum(f, "mlxserve_generated_tokens_total");
    const requests = sum(f, "mlxserve_requests_total", (l) => !QUIET.some((re) => re.test(l.route)));
    if (this.last) {
      const dt = Math.max(now - this.last.time, 0.001);
      const s = this.series;
      s.t.push(now);
      s.tps.push(Math.max(generated - this.last.generated, 0) / dt);
      s.rps.push(Math.max(requests - this.last.requests, 0) / dt);
      s.running.push(sum(f, "mlxserve_requests_running"));
      s.mem.push(sum(f, "mlxserve_process_resident_memory_bytes") / 1e9);
      s.models.push(sum(f, "mlxserve_model_memory_bytes") / 1e9);
      for (const key of Object.keys(s)) if (s[key].length > KEEP) s[key].shift();
      this.draw();
    }
    this.last = { time: now, generated, requests };
    const running = byModel(f, "mlxserve_requests_running");
    const queued = byModel(f, "mlxserve_requests_queued");
    const total = sum(f, "mlxserve_generated_tokens_total");
    $("#server-summary").textContent = `${loaded.instances.length} loaded · ${count(total)} tokens generated · ${bytes(sum(f, "mlxserve_process_resident_memory_bytes"))} resident`;
    this.renderInstances(loaded.instances, running, queued);
  }

  chart(id, series, format, floor) {
    const box = $(id);
    const width = Math.max(box.clientWidth, 260);
    const styles = getComputedStyle(document.documentElement);
    const accent = styles.getPropertyValue("--accent").trim();
    const accent2 = styles.getPropertyValue("--accent-2").trim();
    const grid = styles.getPropertyValue("--border").trim();
    const text = styles.getPropertyValue("--muted").trim();
    const colors = [accent, accent2];
    const axis = { stroke: text, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid } };
    const opts = {
      width,
      height: 180,
      legend: { show: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max * 1.15, floor)] } },
      axes: [
        { ...axis, space: 70, values: (u, ticks) => ticks.map((t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false })) },
        { ...axis, size: 76, values: (u, ticks) => ticks.map(format) },
      ],
      series: [{}, ...series.map((label, i) => ({ label, stroke: colors[i], width: 2, fill: i === 0 ? `${accent}22` : undefined, value: (u, v) => (v == null ? "–" : format(v)) }))],
    };
    return new uPlot(opts, [[]], box);
  }

  draw() {
    const s = this.series;
    if (!this.charts.tps) {
      this.charts.tps = this.chart("#chart-tps", ["tokens/s"], (v) => v.toFixed(v < 10 ? 1 : 0), 1);
      this.charts.mem = this.chart("#chart-mem", ["process", "models"], (v) => `${v.toFixed(v < 1 ? 2 : 1)} GB`, 0.1);
      this.charts.req = this.chart("#chart-req", ["requests/s", "running"], (v) => v.toFixed(v < 10 ? 1 : 0), 1);
      window.addEventListener("resize", () => {
        for (const [key, chart] of Object.entries(this.charts)) chart.setSize({ width: Math.max($(`#chart-${key}`).clientWidth, 260), height: 180 });
      });
    }
    this.charts.tps.setData([s.t, s.tps]);
    this.charts.mem.setData([s.t, s.mem, s.models]);
    this.charts.req.setData([s.t, s.rps, s.running]);
  }

  renderInstances(instances, running, queued) {
    const body = $("#instances tbody");
    body.replaceChildren(
      ...instances.map((i) =>
        el(
          "tr",
          { dataset: { instance: i.id } },
          el("td", {}, el("div", { class: "model-name", text: i.id }), i.id !== i.model ? el("div", { class: "model-sub mono", text: i.model }) : null),
          el("td", {}, el("span", { class: `pill ${i.format}`, text: i.format.toUpperCase() })),
          el("td", { text: count(i.context_length) }),
          el("td", { text: bytes(i.memory_bytes) }),
          el("td", { class: "running", text: String(running[i.id] ?? 0) }),
          el("td", { class: "queued", text: String(queued[i.id] ?? 0) }),
          el("td", { text: i.ttl_left_seconds == null ? "no TTL" : duration(i.ttl_left_seconds) }),
          el("td", { class: "actions" }, el("button", { class: "small", onclick: () => this.unload(i.id) }, "Unload")),
        ),
      ),
    );
    if (!instances.length) body.append(el("tr", {}, el("td", { colspan: 8, class: "muted", text: "Nothing loaded. Models load when a chat uses them, or from Models." })));
  }

  async unload(id) {
    try {
      await api("/api/v1/models/unload", { method: "POST", body: { instance_id: id } });
      await this.sample();
    } catch (error) {
      toast(error.message, true);
    }
  }

  followLog() {
    if (this.logAbort) return;
    const controller = new AbortController();
    this.logAbort = controller;
    const log = $("#log");
    stream("/api/v1/logs/stream", {
      method: "GET",
      signal: controller.signal,
      onEvent: (name, event) => {
        if (!event || (event.type !== "request" && event.type !== "response")) return;
        if (QUIET.some((re) => re.test(event.path))) return;
        const time = new Date((event.timestamp || Date.now() / 1000) * 1000).toLocaleTimeString();
        const head =
          event.type === "request"
            ? `${time} → ${event.method} ${event.path}`
            : `${time} ← ${event.status} ${event.method} ${event.path} (${event.duration_ms} ms)`;
        const shown = typeof event.body === "string" ? event.body : JSON.stringify(event.body);
        const body = event.body ? `\n   ${shown.slice(0, 600)}` : "";
        const cls = event.type === "request" ? "req" : event.status >= 400 ? "err" : "res";
        log.append(el("span", { class: cls, text: head }), body + "\n");
        while (log.childNodes.length > 1000) log.firstChild.remove();
        log.scrollTop = log.scrollHeight;
      },
    }).catch(() => {
      if (this.logAbort === controller) this.logAbort = null;
    });
  }

  async renderTokens() {
    const box = $("#tokens");
    if (!token()) {
      box.replaceChildren(el("p", { class: "muted" }, "Token management needs a token: start the server with ", el("code", { text: "--require-auth" }), ", create one with ", el("code", { text: "mlxserve token create" }), " and sign in with it."));
      return;
    }
    let tokens;
    try {
      tokens = (await api("/api/v1/tokens")).data;
    } catch (error) {
      box.replaceChildren(el("p", { class: "error", text: error instanceof ApiError ? error.message : String(error) }));
      return;
    }
    const table = el(
      "table",
      { class: "table" },
      el("thead", {}, el("tr", {}, el("th", { text: "Name" }), el("th", { text: "Id" }), el("th", { text: "Created" }), el("th"))),
      el(
        "tbody",
        {},
        tokens.map((t) =>
          el(
            "tr",
            { dataset: { token: t.id } },
            el("td", { text: t.name || "–" }),
            el("td", { class: "mono", text: t.id }),
            el("td", { text: new Date(t.created_at * 1000).toLocaleString() }),
            el("td", { class: "actions" }, el("button", { class: "small ghost revoke", onclick: () => this.revoke(t) }, "Revoke")),
          ),
        ),
      ),
    );
    const name = el("input", { type: "text", placeholder: "name (optional)", "aria-label": "Token name" });
    const form = el("form", { class: "token-form" }, name, el("button", { class: "primary small", type: "submit" }, "Create token"));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const created = await api("/api/v1/tokens", { method: "POST", body: { name: name.value.trim() } });
        await this.renderTokens();
        box.prepend(el("div", { class: "token-new" }, el("strong", { text: "New token (shown once): " }), el("code", { class: "new-token", text: created.token })));
      } catch (error) {
        toast(error.message, true);
      }
    });
    box.replaceChildren(table, form);
  }

  async revoke(t) {
    if (!confirm(`Revoke ${t.name || t.id}? Clients using it stop working.`)) return;
    try {
      await api(`/api/v1/tokens/${encodeURIComponent(t.id)}`, { method: "DELETE" });
      await this.renderTokens();
    } catch (error) {
      toast(error.message, true);
    }
  }
}
