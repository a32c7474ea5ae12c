// Models: what is downloaded (load with options, unload, delete), and Hugging Face search with
// downloads that show progress, speed and time left, and can be cancelled and resumed.
import { api } from "/app/api.js";
import { $, bytes, count, duration, el, toast } from "/app/ui.js";

const SOURCES = { models: "Models folder", lmstudio: "LM Studio", "hf-cache": "HF cache" };

export class ModelsView {
  constructor(chat) {
    this.chat = chat;
    this.jobs = new Map();
    this.timer = 0;
    $("#search-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.search();
    });
    $("#load-form").addEventListener("submit", (event) => this.submitLoad(event));
  }

  async enter() {
    await Promise.all([this.refresh(), this.loadJobs()]);
    this.poll();
  }

  // Downloads this server runs or ran (started here, in another tab, or by `mlxserve get`).
  async loadJobs() {
    const { data } = await api("/api/v1/models/download");
    for (const status of data.slice().reverse()) {
      if (this.jobs.has(status.job_id) || status.status === "completed") continue;
      const spec = status.quantization ? `${status.model}@${status.quantization}` : status.model;
      this.jobs.set(status.job_id, { spec, status });
      this.renderJob(status.job_id);
    }
  }

  leave() {
    clearTimeout(this.timer);
    this.timer = 0;
  }

  poll() {
    clearTimeout(this.timer);
    this.timer = setTimeout(async () => {
      await this.updateJobs();
      if (!$("#view-models").hidden) this.poll();
    }, 500);
  }

  async refresh() {
    const { models } = await api("/api/v1/models");
    const body = $("#models-table tbody");
    body.replaceChildren(...models.map((m) => this.row(m)));
    if (!models.length) body.append(el("tr", {}, el("td", { colspan: 9, class: "muted", text: "No models yet. Search Hugging Face below." })));
    const total = models.reduce((n, m) => n + (m.size_bytes || 0), 0);
    $("#models-summary").textContent = `${models.length} model${models.length === 1 ? "" : "s"} · ${bytes(total)}`;
  }

  row(model) {
    const caps = [];
    if (model.type === "embedding") caps.push(el("span", { class: "pill", text: "embeddings" }));
    if (model.capabilities?.trained_for_tool_use) caps.push(el("span", { class: "pill", text: "tools" }));
    if (model.capabilities?.reasoning) caps.push(el("span", { class: "pill", text: "reasoning" }));
    if (model.capabilities?.vision) caps.push(el("span", { class: "pill", text: "vision" }));
    const instances = model.loaded_instances.map((i) =>
      el(
        "div",
        { class: "instance-line", dataset: { instance: i.id } },
        el("span", { class: "pill loaded", text: "loaded" }),
        el("span", { class: "instance-context", text: `${i.id} · context ${count(i.config.context_length)}` }),
        el("button", { class: "small unload", onclick: () => this.unload(i.id) }, "Unload"),
      ),
    );
    return el(
      "tr",
      { dataset: { model: model.key } },
      el("td", {}, el("div", { class: "model-name", text: model.display_name || model.key }), el("div", { class: "model-sub mono", text: model.key }), instances),
      el("td", {}, el("span", { class: `pill ${model.format}`, text: model.format.toUpperCase() })),
      el("td", { text: bytes(model.size_bytes) }),
      el("td", { text: model.quantization?.name || "–" }),
      el("td", { text: model.params_string || "–" }),
      el("td", { text: count(model.max_context_length) }),
      el("td", {}, caps.length ? caps : "–"),
      el("td", { text: SOURCES[model.source] || model.source || "–" }),
      el(
        "td",
        { class: "actions" },
        el("button", { class: "small primary load", onclick: () => this.openLoad(model) }, "Load"),
        model.source === "models" ? el("button", { class: "small ghost delete", onclick: () => this.remove(model) }, "Delete") : null,
      ),
    );
  }

  openLoad(model) {
    const form = $("#load-form");
    form.reset();
    form.dataset.model = model.key;
    $("#load-model").textContent = model.display_name || model.key;
    form.elements.context_length.placeholder = `default, up to ${count(model.max_context_length)}`;
    form.elements.context_length.max = model.max_context_length;
    for (const label of form.querySelectorAll(".only-mlx")) label.hidden = model.format !== "mlx";
    for (const label of form.querySelectorAll(".only-gguf")) label.hidden = model.format !== "gguf";
    $("#load-error").hidden = true;
    $("#load-dialog").showModal();
    form.elements.context_length.focus();
  }

  async submitLoad(event) {
    if (event.submitter && event.submitter.value !== "load") return;
    event.preventDefault();
    const form = $("#load-form");
    const body = { model: form.dataset.model };
    for (const name of ["context_length", "ttl", "eval_batch_size", "num_experts", "parallel", "kv_cache_quantization"]) {
      const value = form.elements[name].value.trim();
      if (value) body[name] = Number(value);
    }
    if (form.elements.identifier.value.trim()) body.identifier = form.elements.identifier.value.trim();
    for (const name of ["cache_type_k", "cache_type_v"]) {
      if (form.elements[name].value) body[name] = form.elements[name].value;
    }
    for (const name of ["flash_attention", "offload_kv_cache_to_gpu"]) {
      const value = form.elements[name].value;
      if (value) body[name] = value === "true";
    }
    const go = $("#load-go");
    go.disabled = true;
    go.textContent = "Loading…";
    try {
      const loaded = await api("/api/v1/models/load", { method: "POST", body });
      $("#load-dialog").close();
      toast(`Loaded ${loaded.instance_id} in ${loaded.load_time_seconds}s`);
      await this.refresh();
      this.chat.loadModels();
    } catch (error) {
      $("#load-error").textContent = error.message;
      $("#load-error").hidden = false;
    } finally {
      go.disabled = false;
      go.textContent = "Load";
    }
  }

  async unload(instanceId) {
    try {
      await api("/api/v1/models/unload", { method: "POST", body: { instance_id: instanceId } });
      toast(`Unloaded ${instanceId}`);
      await this.refresh();
      this.chat.loadModels();
    } catch (error) {
      toast(error.message, true);
    }
  }

  async remove(model) {
    if (!confirm(`Delete ${model.key} (${bytes(model.size_bytes)}) from disk?`)) return;
    try {
      await api("/api/v1/models/delete", { method: "POST", body: { model: model.key } });
      toast(`Deleted ${model.key}`);
      await this.refresh();
      this.chat.loadModels();
    } catch (error) {
      toast(error.message, true);
    }
  }

  // --- Hugging Face -----------------------------------------------------------------------

  async search() {
    const q = $("#search-q").value.trim();
    if (!q) return;
    const results = $("#search-results");
    results.replaceChildren(el("p", { class: "muted", text: "Searching Hugging Face…" }));
    const params = new URLSearchParams({ q });
    if ($("#search-format").value) params.set("format", $("#search-format").value);
    try {
      const found = await api(`/api/v1/models/search?${params}`);
      results.replaceChildren(...found.data.map((m) => this.result(m)));
      if (!found.data.length) results.append(el("p", { class: "muted", text: `No MLX or GGUF model matches “${q}”.` }));
    } catch (error) {
      results.replaceChildren(el("p", { class: "error", text: error.message }));
    }
  }

  result(model) {
    const quants = model.quantizations.map((q) => {
      const spec = model.format === "gguf" && q.name ? `${model.id}@${q.name}` : model.id;
      const fit = q.fits === false ? el("span", { class: "pill no", text: "too large" }) : null;
      const action = q.downloaded
        ? el("span", { class: "pill loaded", text: "downloaded" })
        : el("button", { class: "small primary download", dataset: { spec }, onclick: () => this.download(spec) }, "Download");
      return el("div", { class: "quant" }, el("strong", { text: q.name || "weights" }), el("span", { class: "muted", text: bytes(q.size_bytes) }), fit, action);
    });
    return el(
      "div",
      { class: "result", dataset: { repo: model.id } },
      el(
        "div",
        { class: "result-head" },
        el("div", {}, el("span", { class: "model-name", text: model.id }), " ", el("span", { class: `pill ${model.format}`, text: model.format.toUpperCase() })),
        el("span", { class: "muted", text: `${count(model.downloads)} downloads · ${count(model.likes)} likes` }),
      ),
      el("div", { class: "quants" }, quants),
    );
  }

  async download(spec) {
    try {
      const started = await api("/api/v1/models/download", { method: "POST", body: { model: spec } });
      if (started.status === "already_downloaded") {
        toast(`${spec} is already downloaded`);
        return;
      }
      this.jobs.set(started.job_id, { spec, status: started });
      this.renderJob(started.job_id);
      this.poll();
    } catch (error) {
      toast(error.message, true);
    }
  }

  async cancel(jobId) {
    try {
      const status = await api(`/api/v1/models/download/${encodeURIComponent(jobId)}`, { method: "DELETE" });
      this.jobs.get(jobId).status = status;
      this.renderJob(jobId);
    } catch (error) {
      toast(error.message, true);
    }
  }

  async resume(jobId) {
    const job = this.jobs.get(jobId);
    this.jobs.delete(jobId);
    $(`.download[data-job="${jobId}"]`)?.remove();
    await this.download(job.spec);
  }

  async updateJobs() {
    for (const [jobId, job] of this.jobs) {
      if (job.status.status !== "downloading") continue;
      try {
        job.status = await api(`/api/v1/models/download/status/${encodeURIComponent(jobId)}`);
      } catch (error) {
        job.status = { ...job.status, status: "failed", error: error.message };
      }
      this.renderJob(jobId);
      if (job.status.status === "completed") {
        toast(`Downloaded ${job.spec}`);
        await this.refresh();
        this.chat.loadModels();
        this.search();
      }
    }
  }

  renderJob(jobId) {
    const job = this.jobs.get(jobId);
    const s = job.status;
    const total = s.total_size_bytes || 0;
    const done = s.downloaded_bytes || 0;
    const share = total ? done / total : 0;
    let detail = `${bytes(done)} of ${bytes(total)}`;
    if (s.status === "downloading") {
      const speed = s.bytes_per_second || 0;
      detail += speed ? ` · ${bytes(speed)}/s · ${duration((total - done) / speed)} left` : " · starting…";
    } else if (s.status === "completed") {
      detail = `Done · ${bytes(total)}`;
    } else {
      detail = s.error || "failed";
    }
    const bar = el("div", {});
    bar.style.width = `${(share * 100).toFixed(1)}%`;
    const actions =
      s.status === "downloading"
        ? el("button", { class: "small ghost cancel", onclick: () => this.cancel(jobId) }, "Cancel")
        : s.status === "failed"
          ? el("button", { class: "small primary resume", onclick: () => this.resume(jobId) }, "Resume")
          : null;
    const node = el(
      "div",
      { class: `download ${s.status}`, dataset: { job: jobId, progress: share.toFixed(4) } },
      el("div", { class: "download-head" }, el("strong", { text: job.spec }), actions),
      el("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(share * 100) }, bar),
      el("div", { class: "muted detail", text: detail }),
    );
    const existing = $(`.download[data-job="${jobId}"]`);
    if (existing) existing.replaceWith(node);
    else $("#downloads").prepend(node);
  }
}
