// EZTinker dashboard: plain JavaScript, no build step, no third-party code.
//
// Data comes from the native API (/v1/...) and the dashboard's own views (/dashboard/api/...). Live
// updates come from one server-sent event stream (/dashboard/api/events), read with fetch so that the
// API key travels in the X-API-Key header like every other request's. The server ends a stream every
// half minute; the page reconnects at once, asking only for the metric points it lacks.
"use strict";

const KEY_STORAGE = "eztinker.apiKey";
const THROUGHPUT_POINTS = 600;
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  runs: null, // null until the stream's first `runs` event
  queue: null,
  checkpoints: [],
  stats: null,
  samplers: [],
  runId: undefined, // the run view's run (undefined before the first route)
  metrics: [], // its metric history, oldest first
  throughput: [], // {x: seconds since the page opened, y: training tokens/s}
  stream: null, // AbortController of the live stream
  preselect: null, // playground source to select next time it renders
  openedAt: Date.now() / 1000,
};

// --- small helpers -------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  for (const child of children.flat()) if (child != null) el.append(child instanceof Node ? child : String(child));
  return el;
}

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  if (text != null) el.textContent = text;
  return el;
}

function setAttrs(el, attrs) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : value);
  }
}

function headers(extra = {}) {
  return state.key ? { "X-API-Key": state.key, ...extra } : extra;
}

async function errorText(response) {
  try {
    return (await response.json()).error || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const response = await fetch(path, {
    method,
    headers: headers(body ? { "Content-Type": "application/json" } : {}),
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!response.ok) throw new Error(await errorText(response));
  return response.status === 204 ? null : response.json();
}

function notice(text) {
  const el = $("notice");
  el.textContent = text || "";
  el.hidden = !text;
}

function fmtNum(value, digits = 4) {
  if (value == null || !Number.isFinite(value)) return "—";
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e6)) {
    return Number(value.toPrecision(Math.min(digits, 3))).toExponential(); // 5e-4, 1.25e-5
  }
  return String(Number(value.toPrecision(digits)));
}

function fmtInt(value) {
  return value == null ? "—" : Math.round(value).toLocaleString("en-US");
}

function fmtBytes(bytes) {
  if (bytes == null) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) {
    bytes /= 1024;
    i += 1;
  }
  return `${bytes.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtDuration(seconds) {
  seconds = Math.max(0, seconds);
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

// Relative times are <time data-ago=epoch> / <time data-in=epoch>, refreshed every second.
function ago(epoch) {
  return h("time", { "data-ago": epoch, title: new Date(epoch * 1000).toLocaleString() }, agoText(epoch));
}
function agoText(epoch) {
  return `${fmtDuration(Date.now() / 1000 - epoch)} ago`;
}
function inText(epoch) {
  const seconds = epoch - Date.now() / 1000;
  return seconds <= 0.05 ? "now" : `in ${fmtDuration(seconds)}`;
}
function refreshTimes() {
  for (const el of document.querySelectorAll("time[data-ago]")) el.textContent = agoText(+el.dataset.ago);
  for (const el of document.querySelectorAll("time[data-in]")) el.textContent = inText(+el.dataset.in);
}

function shortModel(name) {
  const parts = name.replace(/\/+$/, "").split("/");
  return parts.length > 2 ? `…/${parts.slice(-2).join("/")}` : name;
}

function fmtLora(config) {
  const parts = [`r=${config.r}`, `α=${fmtNum(config.lora_alpha, 3)}`];
  if (config.lora_dropout) parts.push(`dropout=${fmtNum(config.lora_dropout, 3)}`);
  if (config.target_modules) {
    const targets = Array.isArray(config.target_modules) ? config.target_modules.join(",") : config.target_modules;
    parts.push(`targets=${targets}`);
  }
  return parts.join(" ");
}

function badge(text) {
  return h("span", { class: `badge ${text}` }, text);
}

function runLink(runId) {
  return h("a", { href: `#/runs/${encodeURIComponent(runId)}` }, h("code", {}, runId));
}

function fillTable(table, rows, emptyId) {
  table.tBodies[0].replaceChildren(...rows);
  if (emptyId) $(emptyId).hidden = rows.length > 0;
}

function tile(label, value, sub, fraction) {
  return h(
    "div",
    { class: "tile" },
    h("div", { class: "label" }, label),
    h("div", { class: "value" }, value),
    sub ? h("div", { class: "sub" }, sub) : null,
    fraction == null
      ? null
      : h("div", { class: "bar" }, h("span", { style: `width:${Math.min(100, Math.max(0, fraction * 100)).toFixed(1)}%` })),
  );
}

function facts(dl, entries) {
  dl.replaceChildren(
    ...entries.map(([term, value]) => h("div", {}, h("dt", {}, term), h("dd", {}, value))),
  );
}

// --- charts: hand-drawn SVG ----------------------------------------------------------------------

function niceTicks(lo, hi, count) {
  const span = hi - lo;
  const magnitude = 10 ** Math.floor(Math.log10(span / count));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => span / s <= count) || span;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

function extent(values) {
  return [Math.min(...values), Math.max(...values)];
}

// Draw `points` ({x, y}) into an <svg> in the units of its viewBox. Long noisy series (smooth) get a faint
// raw line under an exponential moving average, as TensorBoard draws them. `data-count` holds the count.
function drawChart(el, points, { smooth = false, xLabel = "step" } = {}) {
  const { width: W, height: H } = el.viewBox.baseVal;
  const L = 58, R = 14, T = 12, B = 28;
  const pts = points.filter((p) => p.y != null && Number.isFinite(p.y));
  el.replaceChildren();
  el.dataset.count = String(pts.length);
  if (!pts.length) {
    el.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "placeholder" }, "No data yet"));
    return;
  }
  let [x0, x1] = extent(pts.map((p) => p.x));
  let [y0, y1] = extent(pts.map((p) => p.y));
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  const pad = y1 === y0 ? Math.abs(y0) * 0.1 || 1 : (y1 - y0) * 0.08;
  [y0, y1] = [y0 - pad, y1 + pad];
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);

  for (const y of niceTicks(y0, y1, 4)) {
    el.append(svg("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "grid" }));
    el.append(svg("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end", class: "axis" }, fmtNum(y, 3)));
  }
  for (const x of niceTicks(x0, x1, Math.round(W / 100)).filter((x) => xLabel !== "step" || Number.isInteger(x))) {
    el.append(svg("text", { x: sx(x), y: H - 8, "text-anchor": "middle", class: "axis" }, fmtNum(x, 4)));
  }
  const path = (series) => series.map((p, i) => `${i ? "L" : "M"}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join("");
  if (smooth && pts.length > 12) {
    let average = 0;
    const smoothed = pts.map((p, i) => {
      average = 0.8 * average + 0.2 * p.y;
      return { x: p.x, y: average / (1 - 0.8 ** (i + 1)) }; // debiased, so the first points are not pulled to 0
    });
    el.append(svg("path", { d: path(pts), class: "raw" }), svg("path", { d: path(smoothed), class: "line" }));
  } else {
    el.append(svg("path", { d: path(pts), class: "line" }));
    if (pts.length <= 60) for (const p of pts) el.append(svg("circle", { cx: sx(p.x), cy: sy(p.y), r: 2.5, class: "dot" }));
  }

  // Hover: the nearest point's value.
  const cursor = svg("line", { y1: T, y2: H - B, class: "cursor", visibility: "hidden" });
  const tip = svg("text", { y: T + 12, class: "tip", visibility: "hidden" });
  const overlay = svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "transparent" });
  overlay.addEventListener("mousemove", (event) => {
    const box = el.getBoundingClientRect();
    const x = x0 + (((event.clientX - box.left) / box.width) * W - L) / (W - L - R) * (x1 - x0);
    const p = pts.reduce((best, q) => (Math.abs(q.x - x) < Math.abs(best.x - x) ? q : best));
    for (const attr of ["x1", "x2"]) cursor.setAttribute(attr, sx(p.x));
    tip.setAttribute("x", Math.min(sx(p.x) + 6, W - R - 150));
    tip.textContent = `${xLabel} ${fmtNum(p.x, 6)}: ${fmtNum(p.y, 5)}`;
    cursor.setAttribute("visibility", "visible");
    tip.setAttribute("visibility", "visible");
  });
  overlay.addEventListener("mouseleave", () => {
    cursor.setAttribute("visibility", "hidden");
    tip.setAttribute("visibility", "hidden");
  });
  el.append(cursor, tip, overlay);
}

// --- pages ---------------------------------------------------------------------------------------

function renderRuns() {
  const rows = [...(state.runs || [])].reverse().map((run) =>
    h(
      "tr",
      { "data-run": run.run_id },
      h("td", {}, runLink(run.run_id)),
      h("td", { title: run.base_model }, shortModel(run.base_model)),
      h("td", { class: "mono" }, fmtLora(run.lora_config)),
      h("td", { class: "num" }, run.step),
      h("td", { class: "num" }, fmtNum(run.last_loss)),
      h("td", {}, badge(run.status)),
      h("td", {}, run.owner == null ? "—" : run.mine ? `you (${run.owner})` : h("code", {}, run.owner)),
      h("td", {}, ago(run.updated_at || run.created_at)),
    ),
  );
  fillTable($("runs-table"), rows, state.runs == null ? null : "runs-empty");
}

function renderRun() {
  if (!state.runId) return;
  $("run-title").textContent = state.runId;
  const run = (state.runs || []).find((r) => r.run_id === state.runId);
  if (!run) {
    facts($("run-facts"), [["Status", state.runs == null ? "loading…" : "no such run (or not yours)"]]);
  } else {
    facts($("run-facts"), [
      ["Base model", h("span", { title: run.base_model }, shortModel(run.base_model))],
      ["LoRA", h("span", { class: "mono" }, fmtLora(run.lora_config))],
      ["Loss", run.loss_config.loss_type || "cross_entropy"],
      ["Step", String(run.step)],
      ["Last loss", fmtNum(run.last_loss)],
      ["Status", badge(run.status)],
      ["Adapter parameters", fmtInt(run.num_parameters)],
      ["Owner", run.owner == null ? "—" : run.mine ? `you (${run.owner})` : run.owner],
      ["Created", ago(run.created_at)],
    ]);
  }
  const history = state.metrics;
  drawChart($("chart-loss"), history.map((m) => ({ x: m.step, y: m.loss })), { smooth: true });
  drawChart($("chart-lr"), history.map((m) => ({ x: m.step, y: m.learning_rate })));
  drawChart($("chart-grad"), history.map((m) => ({ x: m.step, y: m.grad_norm })), { smooth: true });
  drawChart($("chart-tokens"), history.map((m) => ({ x: m.step, y: m.num_tokens })));
  const rows = state.checkpoints.filter((c) => c.run_id === state.runId).map((c) => checkpointRow(c, false));
  fillTable($("run-checkpoints"), rows);
}

function checkpointRow(checkpoint, withRun) {
  const { run_id: runId, name } = checkpoint;
  const base = `/v1/runs/${encodeURIComponent(runId)}/checkpoints/${encodeURIComponent(name)}`;
  const merged = `/dashboard/api/runs/${encodeURIComponent(runId)}/checkpoints/${encodeURIComponent(name)}/merged`;
  return h(
    "tr",
    { "data-checkpoint": `${runId}/${name}` },
    withRun ? h("td", {}, runLink(runId)) : null,
    h("td", {}, h("code", {}, name)),
    h("td", {}, checkpoint.kind),
    h("td", { class: "num" }, checkpoint.step),
    h("td", { class: "num" }, fmtBytes(checkpoint.size_bytes)),
    h("td", {}, ago(checkpoint.created_at)),
    h(
      "td",
      { class: "actions" },
      h("button", {
        class: "small secondary download",
        title: "The PEFT adapter directory (plus optimizer state, if saved) as .tar.gz",
        onclick: (e) => download(`${base}/archive`, `${runId}-${name}.tar.gz`, e.currentTarget),
      }, "Download"),
      h("button", {
        class: "small secondary export",
        title: "The adapter merged into its base model: a full Hugging Face model directory as .tar.gz (slow)",
        onclick: (e) => download(merged, `${runId}-${name}-merged.tar.gz`, e.currentTarget),
      }, "Export merged"),
      h("button", { class: "small danger delete", onclick: () => deleteCheckpoint(runId, name) }, "Delete"),
    ),
  );
}

function renderCheckpoints() {
  const rows = [...state.checkpoints].reverse().map((c) => checkpointRow(c, true));
  fillTable($("checkpoints-table"), rows, "checkpoints-empty");
  if (state.runId) renderRun();
}

// Downloads go through fetch so that the key is sent as a header; the browser saves the blob.
async function download(url, filename, button) {
  const label = button.textContent;
  button.disabled = true;
  button.textContent = label === "Export merged" ? "Merging…" : "Preparing…";
  try {
    const response = await fetch(url, { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    const href = URL.createObjectURL(await response.blob());
    const link = h("a", { href, download: filename, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(href), 60_000);
  } catch (error) {
    notice(`Could not download ${filename}: ${error.message}`);
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

async function deleteCheckpoint(runId, name) {
  if (!confirm(`Delete checkpoint ${name} of run ${runId}? Its files are removed from the server.`)) return;
  try {
    await api(`/v1/runs/${encodeURIComponent(runId)}/checkpoints/${encodeURIComponent(name)}`, { method: "DELETE" });
    state.checkpoints = state.checkpoints.filter((c) => !(c.run_id === runId && c.name === name));
    renderCheckpoints();
  } catch (error) {
    notice(`Could not delete ${name}: ${error.message}`);
  }
}

function renderQueue() {
  const queue = state.queue;
  if (!queue) return;
  $("queue-tiles").replaceChildren(
    tile("Waiting", String(queue.queue_depth)),
    tile("Running", String(queue.running)),
    tile("Utilisation", `${Math.round(queue.utilisation * 100)}%`, "busy fraction, last minute", queue.utilisation),
    tile("Jobs per pass", fmtNum(queue.jobs_per_pass, 3), `${fmtInt(queue.passes)} passes`),
    tile("Training tokens/s", fmtInt(queue.tokens_per_second)),
  );
  const rows = queue.jobs.map((job) =>
    h(
      "tr",
      { "data-job": job.job_id },
      h("td", { class: "num" }, job.position == null ? "—" : String(job.position)),
      h("td", {}, h("code", {}, job.job_id)),
      h("td", {}, job.op),
      h("td", {}, job.run_id ? runLink(job.run_id) : "—"),
      h("td", {}, badge(job.status)),
      h("td", { class: "num" }, fmtInt(job.tokens)),
      h("td", {}, ago(job.created_at)),
      h(
        "td",
        {},
        job.started_at != null
          ? h("span", {}, "started ", ago(job.started_at))
          : job.estimated_start != null
            ? h("time", { "data-in": job.estimated_start }, inText(job.estimated_start))
            : "—",
      ),
    ),
  );
  fillTable($("queue-table"), rows, "queue-empty");
}

function renderServer() {
  const stats = state.stats;
  if (!stats) return;
  const health = stats.health;
  facts($("server-facts"), [
    ["Version", health.version],
    ["Device", health.device],
    ["Loaded models", health.loaded_models.length ? health.loaded_models.map(shortModel).join(", ") : "none yet"],
    ["Up for", fmtDuration(stats.uptime_seconds)],
    ["API keys", stats.auth_enabled ? "required" : "off (open server)"],
    ["Runs in memory", String(stats.active_runs)],
  ]);
  $("memory").replaceChildren(
    ...stats.memory.map((m) =>
      tile(
        m.name === "host" ? "Host RAM" : m.name,
        `${fmtBytes(m.used_bytes)} / ${fmtBytes(m.total_bytes)}`,
        m.name === "host"
          ? `this server: ${fmtBytes(m.allocated_bytes)}`
          : `tensors ${fmtBytes(m.allocated_bytes)} · reserved ${fmtBytes(m.reserved_bytes)}`,
        m.used_bytes / m.total_bytes,
      ),
    ),
  );
  const workers = stats.workers || [];
  $("workers-section").hidden = workers.length === 0;
  $("workers").replaceChildren(
    ...workers.map((w) =>
      tile(
        `${w.name} @ ${w.host}`,
        `${w.runs} runs · ${fmtBytes(w.total_bytes - w.free_bytes)} / ${fmtBytes(w.total_bytes)}`,
        `${w.device} · ${w.models.length ? w.models.map(shortModel).join(", ") : "no model yet"} · ` +
          `queue ${w.queue_depth} · sampling ${w.running_rows} rows`,
        (w.total_bytes - w.free_bytes) / w.total_bytes,
      ),
    ),
  );
  const queue = state.queue;
  $("throughput-tiles").replaceChildren(
    tile("Training tokens/s", queue ? fmtInt(queue.tokens_per_second) : "—"),
    tile("Utilisation", queue ? `${Math.round(queue.utilisation * 100)}%` : "—", null, queue ? queue.utilisation : null),
    tile("Tokens trained", fmtInt(stats.tokens_trained)),
    tile("Tokens sampled", fmtInt(stats.tokens_sampled)),
    tile("Queue depth", String(health.queue_depth)),
  );
  drawChart($("chart-throughput"), state.throughput, { xLabel: "s" });
}

// --- playground ----------------------------------------------------------------------------------

async function refreshSamplers() {
  try {
    state.samplers = await api("/dashboard/api/samplers");
  } catch {
    state.samplers = [];
  }
  renderSources();
}

function renderSources() {
  const select = $("sample-source");
  const previous = state.preselect || select.value;
  const groups = [
    ["Base models", (state.stats ? state.stats.health.loaded_models : []).map((m) => [`base:${m}`, shortModel(m)])],
    ["Runs (current weights)", (state.runs || []).filter((r) => r.status === "active").map((r) => [`run:${r.run_id}`, `${r.run_id} · step ${r.step}`])],
    ["Sampler snapshots", state.samplers.map((s) => [`sampler:${s.sampler_id}`, `${s.sampler_id}${s.step != null ? ` · step ${s.step}` : ""}`])],
  ];
  const options = groups
    .filter(([, items]) => items.length)
    .map(([label, items]) => h("optgroup", { label }, items.map(([value, text]) => h("option", { value }, text))));
  select.replaceChildren(...options);
  if (previous && [...select.options].some((o) => o.value === previous)) {
    select.value = previous;
    state.preselect = null;
  }
}

function sourceTarget(source) {
  const split = source.indexOf(":");
  const kind = source.slice(0, split), id = source.slice(split + 1);
  if (kind === "run") {
    const run = (state.runs || []).find((r) => r.run_id === id);
    return { path: `/v1/runs/${encodeURIComponent(id)}/sample`, extra: {}, baseModel: run && run.base_model };
  }
  if (kind === "sampler") {
    const sampler = state.samplers.find((s) => s.sampler_id === id);
    return { path: "/v1/sample", extra: { sampler_id: id }, baseModel: sampler && sampler.base_model };
  }
  return { path: "/v1/sample", extra: { base_model: id }, baseModel: id };
}

async function sample(event) {
  event.preventDefault();
  const button = $("sample-button"), status = $("sample-status");
  const source = $("sample-source").value;
  if (!source) {
    status.textContent = "No weights to sample: no base model is loaded yet.";
    return;
  }
  const { path, extra, baseModel } = sourceTarget(source);
  const prompt = $("sample-prompt").value;
  const seed = $("sample-seed").value;
  const chat = $("sample-chat").checked; // a user turn, rendered by the model's chat template on the server
  const body = {
    ...(chat ? { messages: [{ role: "user", content: prompt }] } : { prompt }),
    temperature: Number($("sample-temperature").value),
    top_p: Number($("sample-top-p").value),
    max_new_tokens: Number($("sample-max-tokens").value),
    ...(seed === "" ? {} : { seed: Number(seed) }),
    ...extra,
  };
  button.disabled = true;
  status.textContent = "queued…";
  const started = performance.now();
  try {
    const ref = await api(path, { method: "POST", body });
    let job = ref;
    while (job.status === "queued" || job.status === "running") {
      status.textContent = `${job.status}…`;
      job = await api(`/v1/jobs/${encodeURIComponent(ref.job_id)}?wait=30`);
    }
    if (job.status !== "completed") throw new Error(job.error || `the job ${job.status}`);
    const result = job.result.samples[0];
    let texts = null;
    if (baseModel) {
      try {
        texts = (await api("/dashboard/api/tokens", { method: "POST", body: { base_model: baseModel, tokens: result.tokens } })).texts;
      } catch {
        texts = null; // shown as one block of text below
      }
    }
    renderSample(prompt, result, texts, (performance.now() - started) / 1000);
    status.textContent = "";
  } catch (error) {
    status.textContent = `Failed: ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

function renderSample(prompt, result, texts, seconds) {
  const out = $("sample-tokens");
  const spans = texts
    ? result.tokens.map((token, i) => {
        const logprob = result.logprobs[i];
        const p = Math.exp(logprob);
        return h(
          "span",
          {
            class: "tok",
            "data-logprob": logprob,
            title: `${JSON.stringify(texts[i])} · token ${token} · logprob ${logprob.toFixed(4)} · p ${p.toFixed(3)}`,
            style: `background: rgba(207, 59, 59, ${(0.55 * (1 - p)).toFixed(3)})`,
          },
          texts[i],
        );
      })
    : [h("span", { class: "tok" }, result.text)];
  out.replaceChildren(h("span", { class: "prompt" }, prompt), ...spans);
  const mean = result.logprobs.length ? result.logprobs.reduce((a, b) => a + b, 0) / result.logprobs.length : null;
  $("sample-meta").textContent =
    `${result.tokens.length} tokens · stopped by ${result.stop_reason} · mean logprob ${fmtNum(mean)} · ${seconds.toFixed(2)} s`;
  $("sample-output").hidden = false;
}

// --- live stream ---------------------------------------------------------------------------------

const handlers = {
  runs(runs) {
    state.runs = runs;
    renderRuns();
    renderRun();
    if (currentPage() === "playground") renderSources();
  },
  metrics(data) {
    if (data.run_id !== state.runId) return;
    if (data.error) return notice(data.error);
    state.metrics = data.reset ? data.history : state.metrics.concat(data.history);
    renderRun();
  },
  queue(queue) {
    state.queue = queue;
    state.throughput.push({ x: Date.now() / 1000 - state.openedAt, y: queue.tokens_per_second });
    if (state.throughput.length > THROUGHPUT_POINTS) state.throughput.shift();
    renderQueue();
    renderServer();
  },
  checkpoints(checkpoints) {
    state.checkpoints = checkpoints;
    renderCheckpoints();
  },
  stats(stats) {
    const first = state.stats == null;
    state.stats = stats;
    renderServer();
    if (first || currentPage() === "playground") renderSources();
  },
};

function dispatch(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (data.length && handlers[event]) handlers[event](JSON.parse(data.join("\n")));
}

function setLive(status, text) {
  const el = $("live");
  el.dataset.state = status;
  el.textContent = text;
}

async function connect() {
  if (state.stream) state.stream.abort();
  const controller = new AbortController();
  state.stream = controller;
  const params = new URLSearchParams();
  if (state.runId) {
    params.set("run", state.runId);
    params.set("after", String(state.metrics.length ? state.metrics[state.metrics.length - 1].step : 0));
  }
  let retryMs = 2000;
  try {
    const response = await fetch(`/dashboard/api/events?${params}`, { headers: headers(), signal: controller.signal });
    if (response.status === 401) {
      setLive("unauthorized", "key needed");
      notice(`${await errorText(response)} — enter your API key at the top right.`);
      return; // until a key is entered
    }
    if (!response.ok) throw new Error(await errorText(response));
    setLive("live", "live");
    notice("");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      // A stream replaced meanwhile (another run or key) may still hand over a chunk read before its abort:
      // its points would land on the new stream's, which sends them again.
      if (controller.signal.aborted) return;
      if (done) break;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        dispatch(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
    retryMs = 0; // the server ends each stream on schedule: reconnect at once
  } catch (error) {
    if (controller.signal.aborted) return;
    setLive("offline", "reconnecting");
  }
  setTimeout(() => {
    if (state.stream === controller) connect();
  }, retryMs);
}

// --- routing and start-up ------------------------------------------------------------------------

function currentPage() {
  const match = (location.hash || "#/runs").match(/^#\/([a-z]+)(?:\/(.+))?$/);
  if (!match) return "runs";
  return match[1] === "runs" && match[2] ? "run" : match[1];
}

function route() {
  const page = currentPage();
  const match = (location.hash || "").match(/^#\/runs\/(.+)$/);
  const runId = page === "run" && match ? decodeURIComponent(match[1]) : null;
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== `page-${page}`;
  if (!$(`page-${page}`)) $("page-runs").hidden = false;
  const tab = page === "run" ? "runs" : page;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("current", link.dataset.page === tab);
  if (page === "playground") refreshSamplers();
  if (runId !== state.runId) {
    state.runId = runId;
    state.metrics = [];
    if (runId) {
      $("run-sample").onclick = () => {
        state.preselect = `run:${runId}`;
      };
      renderRun();
    }
    connect();
  }
}

function useKey(event) {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  if (state.key) localStorage.setItem(KEY_STORAGE, state.key);
  else localStorage.removeItem(KEY_STORAGE);
  Object.assign(state, { runs: null, queue: null, checkpoints: [], samplers: [], metrics: [] });
  notice("");
  renderRuns();
  renderCheckpoints();
  connect();
  if (currentPage() === "playground") refreshSamplers();
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = state.key;
  $("key-form").addEventListener("submit", useKey);
  $("sample-form").addEventListener("submit", sample);
  window.addEventListener("hashchange", route);
  setInterval(refreshTimes, 1000);
  route();
});
