// The chat page: plain JavaScript, no build step. It speaks the websocket protocol of /v1/chat
// (docs/websocket.md) and a few REST calls (collections, conversations, uploads, the OpenAPI
// schema). An upload's ingestion job is followed live with the socket's `watch_job` (per-file
// events, counters, rate, ETA) and can be cancelled.
//
// State kept in this browser (localStorage): the API key, the chosen collection and answer mode,
// and one conversation id per collection, so a reload restores the conversation from the server.
"use strict";

(() => {
  const STORE = "ragsvc.";
  const RECONNECT_MAX_MS = 15000;
  const ERROR_TEXT = {
    llm_unavailable: "The model server is not reachable, so no answer can be written right now. Search still works; try again in a moment.",
    llm_timeout: "The model server took too long to answer. Try again, or ask a shorter question.",
    llm_error: "The model server failed while answering.",
    context_too_long: "The question and its sources do not fit the model's context window. Try a shorter question.",
    unauthorized: "The API key was refused. Enter a valid key.",
    forbidden: "This API key may not use this collection.",
    too_many_requests: "Too many answers are running on this connection; wait for one to finish.",
    cancelled: "Stopped.",
    connection_lost: "The connection dropped before the answer finished. Ask again once it is back.",
  };

  // ------------------------------------------------------------------------------------------ helpers

  const $ = (id) => document.getElementById(id);
  const base = new URL(".", window.location.href);

  const storage = {
    get(name) {
      try { return window.localStorage.getItem(STORE + name); } catch { return null; }
    },
    set(name, value) {
      try {
        if (value === null || value === undefined || value === "") window.localStorage.removeItem(STORE + name);
        else window.localStorage.setItem(STORE + name, value);
      } catch { /* private mode: nothing is kept */ }
    },
  };

  function newId() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") return window.crypto.randomUUID();
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 10); // http:// on a LAN address
  }

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined && child !== false) {
        node.append(child instanceof Node ? child : document.createTextNode(String(child)));
      }
    }
    return node;
  }

  function baseName(path) {
    const parts = String(path || "").split(/[\\/]/);
    return parts[parts.length - 1] || String(path || "");
  }

  // Where a chunk or citation is, as the server names it ("slide 2, Launch plan", "Prices, rows
  // 2-14", "Install > Linux", "page 4"); older servers send only the page.
  function whereText(item) {
    if (!item) return "";
    if (item.location) return item.location;
    return item.page ? `page ${item.page}` : "";
  }

  function errorText(code, message) {
    return ERROR_TEXT[code] || message || `Something went wrong (${code}).`;
  }

  class ApiError extends Error {
    constructor(status, code, message, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  async function api(path, { method = "GET", json } = {}) {
    const headers = { Accept: "application/json" };
    const key = storage.get("apiKey");
    if (key) headers.Authorization = `Bearer ${key}`;
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    let response;
    try {
      response = await fetch(new URL(path, base), { method, headers, body });
    } catch (e) {
      throw new ApiError(0, "network_error", "The service cannot be reached.");
    }
    if (!response.ok) {
      let detail = {};
      try { detail = (await response.json()).error || {}; } catch { /* not JSON */ }
      throw new ApiError(
        response.status,
        detail.code || `http_${response.status}`,
        detail.message || response.statusText,
        response.headers.get("Retry-After"),
      );
    }
    return response.status === 204 ? null : response.json();
  }

  // ------------------------------------------------------------------------------------------ ui state

  const ui = {
    collection: $("collection"),
    mode: $("mode"),
    newConversation: $("new-conversation"),
    keyButton: $("key-button"),
    connection: $("connection"),
    banner: $("banner"),
    messages: $("messages"),
    empty: $("empty"),
    form: $("ask-form"),
    question: $("question"),
    ask: $("ask"),
    stop: $("stop"),
    passage: $("passage"),
    passageTitle: $("passage-title"),
    passageMeta: $("passage-meta"),
    passageText: $("passage-text"),
    keyDialog: $("key-dialog"),
    keyForm: $("key-form"),
    keyInput: $("api-key"),
    keyError: $("key-error"),
    announce: $("announce"),
    uploadButton: $("upload-button"),
    uploadInput: $("upload-input"),
    uploads: $("uploads"),
  };

  /** Answers by request id: {id, node, text, citations: Map n -> citation, chunks: Map id -> {chunk, n}, rounds, state}. */
  const answers = new Map();
  let running = null; // the id of the answer being written (one at a time from this page)
  let ready = false;

  function announce(text) {
    ui.announce.textContent = "";
    window.setTimeout(() => { ui.announce.textContent = text; }, 50);
  }

  function showBanner(text, kind = "warning") {
    ui.banner.textContent = text;
    ui.banner.dataset.kind = kind;
    ui.banner.hidden = !text;
  }

  function setConnection(state, text) {
    ui.connection.dataset.state = state;
    ui.connection.textContent = text;
    updateComposer();
  }

  function updateComposer() {
    const busy = running !== null;
    ui.uploadButton.disabled = !ui.collection.value;
    ui.ask.disabled = busy || !ready || !ui.collection.value;
    ui.stop.hidden = !busy;
    ui.ask.hidden = busy;
  }

  function scrollToEnd() {
    const last = ui.messages.lastElementChild;
    if (last) last.scrollIntoView({ block: "end", behavior: "smooth" });
  }

  // ------------------------------------------------------------------------------------------ rendering

  function appendMarked(container, text, answer) {
    // [n] markers become buttons when source n is known; everything goes in as text nodes (no HTML).
    const pattern = /\[(\d{1,3})\]/g;
    let at = 0;
    let match;
    while ((match = pattern.exec(text)) !== null) {
      const n = Number(match[1]);
      if (!answer.citations.has(n) && !chunkForNumber(answer, n)) continue;
      container.append(text.slice(at, match.index), citeButton(answer, n));
      at = match.index + match[0].length;
    }
    container.append(text.slice(at));
  }

  function renderText(container, text, answer) {
    // Sentences the grounding guard judged (``support`` events) are wrapped in a span marked with
    // the verdict, followed by a small button that opens the supporting passage.
    container.replaceChildren();
    let at = 0;
    for (const s of answer.supports) {
      const i = text.indexOf(s.sentence, at);
      if (i < 0) continue;
      appendMarked(container, text.slice(at, i), answer);
      const supported = s.verdict === "supported";
      const span = el("span", {
        class: `sentence ${s.verdict}`,
        dataset: { verdict: s.verdict, origin: s.origin },
        title: supported
          ? `Supported by source ${s.n ?? "?"} (score ${s.score.toFixed(2)})`
          : `Not supported by the sources (${(s.reason || "low support").replace("_", " ")}, score ${s.score.toFixed(2)})`,
      });
      appendMarked(span, s.sentence, answer);
      container.append(span);
      if (s.chunk_id !== null && answer.chunks.has(s.chunk_id)) {
        container.append(el("button", {
          type: "button",
          class: `verdict ${s.verdict}`,
          text: supported ? "✓" : "?",
          "aria-label": supported ? "Show the passage that supports this sentence" : "Show the closest passage (it does not support this sentence)",
          onclick: () => openSupport(answer, s),
        }));
      }
      at = i + s.sentence.length;
    }
    appendMarked(container, text.slice(at), answer);
  }

  function openSupport(answer, support) {
    const { chunk, n } = answer.chunks.get(support.chunk_id);
    ui.passageTitle.textContent = `${n ? `[${n}] ` : ""}${baseName(chunk.path)}`;
    const meta = [chunk.path];
    if (whereText(chunk)) meta.push(whereText(chunk));
    meta.push(support.verdict === "supported" ? "the sentence that supports the answer is marked" : "closest passage: it does not support the answer");
    ui.passageMeta.textContent = meta.join(" · ");
    const text = chunk.text;
    if (support.start === null || support.end === null) ui.passageText.replaceChildren(text);
    else ui.passageText.replaceChildren(text.slice(0, support.start), el("mark", { text: text.slice(support.start, support.end) }), text.slice(support.end));
    ui.passage.showModal();
  }

  function chunkForNumber(answer, n) {
    for (const entry of answer.chunks.values()) if (entry.n === n) return entry;
    return null;
  }

  function citeButton(answer, n) {
    const citation = answer.citations.get(n);
    const source = citation ? citation.path : chunkForNumber(answer, n)?.chunk.path;
    return el("button", {
      type: "button",
      class: "cite",
      text: `[${n}]`,
      "aria-label": `Source ${n}: ${baseName(source)}`,
      dataset: { n: String(n) },
      onclick: () => openPassage(answer, n),
    });
  }

  function renderSources(answer) {
    const list = answer.node.querySelector(".sources");
    const items = [...answer.citations.values()].sort((a, b) => a.n - b.n);
    list.replaceChildren(
      ...items.map((c) =>
        el(
          "li",
          {},
          citeButton(answer, c.n),
          " ",
          el("span", { class: "source-path", text: baseName(c.path), title: c.path }),
          whereText(c) ? el("span", { class: "source-page", text: ` · ${whereText(c)}` }) : null,
          c.inferred ? el("span", { class: "source-flag", text: " (matched by wording)" }) : null,
        ),
      ),
    );
    answer.node.querySelector(".sources-box").hidden = items.length === 0;
  }

  function renderTrace(answer) {
    const box = answer.node.querySelector(".trace");
    const rounds = answer.rounds;
    box.hidden = rounds.length === 0;
    if (!rounds.length) return;
    const flare = answer.node.dataset.mode === "flare" || rounds.some((r) => r.reason === "low_confidence");
    box.querySelector("summary").textContent =
      `${flare ? "FLARE retrieval" : "Retrieval"}: ${rounds.length} round${rounds.length === 1 ? "" : "s"}`;
    const list = box.querySelector("ol");
    list.replaceChildren(
      ...rounds.map((r) =>
        el(
          "li",
          { class: "round", dataset: { reason: r.reason } },
          el("div", { class: "round-head" },
            el("strong", { text: `Round ${r.round}` }),
            ` · ${r.reason.replace("_", " ")} · ${Math.round(r.elapsed_ms)} ms`),
          el("div", { class: "round-query" }, "Query: ", el("q", { text: r.query })),
          r.trigger && r.trigger.length
            ? el("div", { class: "round-trigger" }, "Unsure about: ",
                ...r.trigger.map((t) =>
                  el("span", {
                    class: "token",
                    text: t.token,
                    title: t.logprob === null ? "" : `p = ${Math.exp(t.logprob).toFixed(2)}`,
                  })))
            : null,
          el("ul", { class: "round-chunks" },
            ...r.chunks.map((c) =>
              el("li", {},
                c.n ? el("span", { class: "round-n", text: `[${c.n}] ` }) : el("span", { class: "round-n", text: "(not in the prompt) " }),
                el("button", {
                  type: "button",
                  class: "link",
                  text: baseName(c.chunk.path) + (whereText(c.chunk) ? ` · ${whereText(c.chunk)}` : ""),
                  "aria-label": `Read retrieved passage from ${baseName(c.chunk.path)}`,
                  onclick: () => openChunk(c.chunk, c.n),
                }),
                el("span", { class: "round-score", text: ` · score ${c.score.toFixed(3)}` })))),
        ),
      ),
    );
  }

  let renderQueued = new Set();
  function scheduleRender(answer) {
    if (renderQueued.has(answer)) return;
    renderQueued.add(answer);
    window.requestAnimationFrame(() => {
      renderQueued.delete(answer);
      renderText(answer.node.querySelector(".answer-text"), answer.text, answer);
      scrollToEnd();
    });
  }

  function setState(answer, state, note) {
    answer.state = state;
    answer.node.dataset.state = state;
    answer.node.setAttribute("aria-busy", state === "streaming" ? "true" : "false");
    const status = answer.node.querySelector(".answer-status");
    status.textContent = note || "";
    status.hidden = !note;
    status.className = `answer-status ${state === "error" ? "error-text" : "muted"}`;
    status.setAttribute("role", state === "error" ? "alert" : "status");
  }

  function addUserMessage(text) {
    ui.empty.hidden = true;
    const node = el("li", { class: "message user" },
      el("span", { class: "visually-hidden", text: "You asked:" }),
      el("p", { class: "message-text", text }));
    ui.messages.append(node);
    return node;
  }

  function addAnswer(id, mode) {
    ui.empty.hidden = true;
    const node = el(
      "li",
      { class: "message assistant", "aria-busy": "true", dataset: { id, mode: mode || "" } },
      el("span", { class: "visually-hidden", text: "Answer:" }),
      el("p", { class: "answer-text message-text" }),
      el("p", { class: "answer-status muted", hidden: true }),
      el("div", { class: "sources-box", hidden: true },
        el("h3", { class: "sources-title", text: "Sources" }),
        el("ul", { class: "sources" })),
      el("details", { class: "trace", hidden: true }, el("summary", { text: "Retrieval" }), el("ol")),
    );
    ui.messages.append(node);
    const answer = { id, node, text: "", citations: new Map(), chunks: new Map(), rounds: [], supports: [], state: "streaming" };
    answers.set(id, answer);
    setState(answer, "streaming", "Thinking…");
    return answer;
  }

  function openPassage(answer, n) {
    const citation = answer.citations.get(n);
    const entry = citation ? answer.chunks.get(citation.chunk_id) : chunkForNumber(answer, n);
    const chunk = entry ? entry.chunk : null;
    const path = citation ? citation.path : chunk?.path;
    const where = whereText(citation || chunk);
    ui.passageTitle.textContent = `[${n}] ${baseName(path)}`;
    const meta = [path];
    if (where) meta.push(where);
    if (citation) meta.push(`characters ${citation.start}–${citation.end}`);
    ui.passageMeta.textContent = meta.join(" · ");
    ui.passageText.replaceChildren(...highlighted(chunk, citation));
    ui.passage.showModal();
  }

  function openChunk(chunk, n) {
    ui.passageTitle.textContent = `${n ? `[${n}] ` : ""}${baseName(chunk.path)}`;
    const meta = [chunk.path];
    if (whereText(chunk)) meta.push(whereText(chunk));
    meta.push(`characters ${chunk.start}–${chunk.end}`, "retrieved passage");
    ui.passageMeta.textContent = meta.join(" · ");
    ui.passageText.replaceChildren(chunk.text);
    ui.passage.showModal();
  }

  function highlighted(chunk, citation) {
    // The snippet is the passage that supports the citing sentence; show it marked inside its chunk.
    const snippet = citation ? citation.snippet : "";
    if (!chunk) return [el("mark", { text: snippet })];
    const text = chunk.text;
    if (!snippet) return [text];
    let at = citation.start - chunk.start;
    if (at < 0 || text.slice(at, at + snippet.length) !== snippet) at = text.indexOf(snippet);
    if (at < 0) return [el("mark", { text: snippet }), el("hr"), text];
    return [text.slice(0, at), el("mark", { text: snippet }), text.slice(at + snippet.length)];
  }

  // ------------------------------------------------------------------------------------------ events

  function onEvent(event) {
    if (uploads.has(event.id)) return onJobEvent(uploads.get(event.id), event);
    const answer = answers.get(event.id);
    if (!answer) {
      if (event.type === "error" && !event.id) showBanner(errorText(event.code, event.message), "error");
      return;
    }
    switch (event.type) {
      case "retrieval":
        answer.rounds.push(event);
        for (const c of event.chunks) answer.chunks.set(c.chunk.id, { chunk: c.chunk, n: c.n });
        if (answer.state === "streaming" && !answer.text) setState(answer, "streaming", "Writing…");
        renderTrace(answer);
        break;
      case "token":
        answer.text += event.text;
        if (!answer.stopping && answer.node.querySelector(".answer-status").textContent) setState(answer, "streaming", "");
        scheduleRender(answer);
        break;
      case "citation":
        answer.citations.set(event.n, event);
        renderSources(answer);
        scheduleRender(answer);
        break;
      case "support":
        answer.supports.push(event);
        scheduleRender(answer);
        break;
      case "done":
        answer.text = event.answer;
        answer.citations.clear(); // the guard may renumber sources in order of first use
        for (const c of event.citations) answer.citations.set(c.n, c);
        if (event.supports && event.supports.length) answer.supports = event.supports;
        answer.node.dataset.noAnswer = event.no_answer ? "true" : "false";
        renderSources(answer);
        renderText(answer.node.querySelector(".answer-text"), answer.text, answer);
        setState(answer, "done", doneNote(event, answer.text));
        finish(answer, "Answer complete.");
        break;
      case "error":
        if (event.code === "cancelled") {
          setState(answer, "stopped", ERROR_TEXT.cancelled);
          finish(answer, "Answer stopped.");
        } else {
          setState(answer, "error", errorText(event.code, event.message));
          answer.node.dataset.error = event.code;
          if (event.code === "not_found" && /conversation/i.test(event.message || "")) {
            storage.set(`conversation.${ui.collection.value}`, null); // gone: the next question starts a new one
          }
          finish(answer, "The answer failed.");
          if (event.code === "unauthorized") openKeyDialog(ERROR_TEXT.unauthorized);
        }
        break;
      default:
        break;
    }
  }

  const FINISH_NOTES = {
    length: "The answer was cut at its length limit.",
    repetition: "The answer was cut because it started repeating itself.",
    guard: "Parts of the model's answer were not supported by the sources; the answer quotes them instead.",
  };

  function doneNote(event, text) {
    if (event.no_answer) return "The documents do not seem to cover this question; the closest sources are listed.";
    if (!text) return "The model wrote no answer.";
    return FINISH_NOTES[event.finish_reason] || "";
  }

  function finish(answer, message) {
    if (running === answer.id) running = null;
    updateComposer();
    announce(message);
    scrollToEnd();
  }

  // ------------------------------------------------------------------------------------------ uploads

  /** Uploads followed on this page, by watch id: {id, jobId, node, files: Map path -> li, state}. */
  const uploads = new Map();

  const FILE_STATUS = {
    new: "waiting", replaced: "waiting", unchanged: "unchanged", rejected: "rejected",
    started: "reading…", indexed: "indexed", failed: "failed", deleted: "removed",
  };

  function fileRow(upload, path, status, detail) {
    let row = upload.files.get(path);
    if (!row) {
      row = el("li", {}, el("span", { class: "name", text: baseName(path), title: path }), el("span", { class: "status" }));
      upload.files.set(path, row);
      upload.node.querySelector(".upload-files").append(row);
    }
    row.dataset.status = status;
    row.querySelector(".status").textContent = detail ? `${FILE_STATUS[status] || status}: ${detail}` : (FILE_STATUS[status] || status);
  }

  function formatSeconds(s) {
    if (s === null || s === undefined) return "";
    if (s < 90) return `${Math.round(s)} s`;
    return `${Math.round(s / 60)} min`;
  }

  function onJobEvent(upload, event) {
    const stats = upload.node.querySelector(".upload-stats");
    const bar = upload.node.querySelector("progress");
    switch (event.type) {
      case "file":
        upload.after = Math.max(upload.after, event.event_id);
        fileRow(upload, event.path, event.status,
          event.status === "indexed" ? `${event.chunks} chunk${event.chunks === 1 ? "" : "s"}` : event.error);
        break;
      case "progress": {
        bar.max = Math.max(1, event.total);
        bar.value = event.done;
        const parts = [`${event.done} of ${event.total || "?"} files`];
        if (event.chunks_per_second) parts.push(`${event.chunks_per_second.toFixed(1)} chunks/s`);
        if (event.eta_seconds !== null && event.eta_seconds !== undefined) parts.push(`about ${formatSeconds(event.eta_seconds)} left`);
        if (event.status === "queued") parts.splice(0, parts.length, "waiting for the ingestion worker…");
        if (event.cancel_requested) parts.push("stopping…");
        stats.textContent = parts.join(" · ");
        break;
      }
      case "job_end": {
        const job = event.job;
        upload.state = job.status;
        upload.node.dataset.state = job.status;
        bar.max = 1;
        bar.value = 1;
        const f = job.files;
        const what = { succeeded: "Indexed", failed: "Failed", cancelled: "Cancelled" }[job.status] || job.status;
        stats.textContent = `${what}: ${f.new + f.changed} new or changed, ${f.unchanged} unchanged, ${f.failed} failed · ${job.chunks_added} chunks`
          + (job.error && job.status !== "cancelled" ? ` · ${job.error}` : "");
        upload.node.querySelector(".upload-cancel").hidden = true;
        announce(`Upload ${what.toLowerCase()}.`);
        loadCollections(); // the document counts changed
        break;
      }
      case "error":
        if (event.code !== "cancelled") stats.textContent = errorText(event.code, event.message);
        upload.node.querySelector(".upload-cancel").hidden = true;
        break;
      default:
        break;
    }
    return undefined;
  }

  function watchUpload(upload) {
    // After a reconnect, only the events not seen yet (rows are keyed by path, so a replay would be harmless too).
    if (upload.jobId !== null && !["succeeded", "failed", "cancelled"].includes(upload.state)) {
      socket.send({ type: "watch_job", id: upload.id, job_id: upload.jobId, after: upload.after });
    }
  }

  async function cancelUpload(upload) {
    try {
      await api(`v1/jobs/${upload.jobId}/cancel`, { method: "POST" });
      upload.node.querySelector(".upload-stats").textContent = "stopping…";
    } catch (e) {
      showBanner(`Could not cancel: ${errorText(e.code, e.message)}`, "error");
    }
  }

  async function uploadFiles(fileList) {
    const collection = ui.collection.value;
    const files = [...fileList];
    if (!collection || !files.length) return;
    const upload = { id: `upload-${newId()}`, jobId: null, after: 0, files: new Map(), state: "uploading", node: null };
    const cancel = el("button", { type: "button", class: "secondary upload-cancel", text: "Cancel", hidden: true,
      onclick: () => cancelUpload(upload) });
    upload.node = el("article", { class: "upload", dataset: { state: "uploading" } },
      el("div", { class: "upload-head" },
        el("span", { class: "upload-title", text: `${files.length} file${files.length === 1 ? "" : "s"} → ${collection}` }),
        cancel),
      el("progress", { max: "1", value: "0", "aria-label": "Ingestion progress" }),
      el("p", { class: "upload-stats", role: "status", "aria-live": "polite", text: "Uploading…" }),
      el("ul", { class: "upload-files" }));
    ui.uploads.prepend(upload.node);
    ui.uploads.hidden = false;
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    const headers = { Accept: "application/json" };
    const key = storage.get("apiKey");
    if (key) headers.Authorization = `Bearer ${key}`;
    let body;
    try {
      const response = await fetch(new URL(`v1/collections/${encodeURIComponent(collection)}/documents`, base),
        { method: "POST", headers, body: form });
      body = await response.json();
      if (!response.ok) throw new ApiError(response.status, body.error?.code, body.error?.message);
    } catch (e) {
      upload.state = "failed";
      upload.node.dataset.state = "failed";
      upload.node.querySelector(".upload-stats").textContent = `Upload failed: ${errorText(e.code, e.message)}`;
      return;
    }
    for (const f of body.files) fileRow(upload, f.path || f.filename, f.status, f.error);
    if (body.job_id === null) {
      upload.state = "succeeded";
      upload.node.dataset.state = "succeeded";
      upload.node.querySelector(".upload-stats").textContent = "Nothing new to index.";
      return;
    }
    upload.jobId = body.job_id;
    upload.state = "queued";
    upload.node.dataset.jobId = String(body.job_id);
    upload.node.querySelector(".upload-stats").textContent = "Queued…";
    cancel.hidden = false;
    uploads.set(upload.id, upload);
    watchUpload(upload);
  }

  // ------------------------------------------------------------------------------------------ socket

  class ChatSocket {
    constructor() {
      this.ws = null;
      this.attempt = 0;
      this.timer = null;
      this.wasConnected = false;
      this.authFailed = false;
    }

    url() {
      const url = new URL("v1/chat", base);
      url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
      return url.toString();
    }

    connect() {
      window.clearTimeout(this.timer);
      this.authFailed = false;
      ready = false;
      setConnection("connecting", this.attempt ? `Reconnecting (attempt ${this.attempt + 1})…` : "Connecting…");
      const ws = new WebSocket(this.url());
      this.ws = ws;
      ws.addEventListener("open", () => {
        const key = storage.get("apiKey");
        // Browsers cannot set headers on a websocket: the key goes in the first message.
        if (key) ws.send(JSON.stringify({ type: "auth", api_key: key }));
      });
      ws.addEventListener("message", (message) => {
        let event;
        try { event = JSON.parse(message.data); } catch { return; }
        if (event.type === "ready") return this.onReady();
        if (event.type === "ping" || event.type === "pong") return undefined;
        if (event.type === "error" && event.code === "unauthorized" && !event.id) {
          this.authFailed = true;
          return undefined;
        }
        return onEvent(event);
      });
      ws.addEventListener("close", (close) => {
        if (this.ws !== ws) return; // replaced by a newer socket
        this.onClose(close);
      });
    }

    onReady() {
      const reconnected = this.wasConnected && this.attempt > 0;
      ready = true;
      this.attempt = 0;
      this.wasConnected = true;
      setConnection("connected", "Connected");
      if (reconnected) {
        showBanner("Reconnected.", "ok");
        announce("Reconnected.");
        window.setTimeout(() => { if (ui.banner.dataset.kind === "ok") showBanner(""); }, 4000);
      } else {
        showBanner("");
      }
      for (const upload of uploads.values()) watchUpload(upload); // follow them again after a reconnect
    }

    onClose(close) {
      ready = false;
      // Every answer in flight on this socket was stopped by the server when it went away.
      for (const answer of answers.values()) {
        if (answer.state === "streaming") {
          setState(answer, "error", ERROR_TEXT.connection_lost);
          answer.node.dataset.error = "connection_lost";
          finish(answer, "Connection lost.");
        }
      }
      if (this.authFailed || close.code === 1008) {
        setConnection("refused", "Not connected: API key needed");
        showBanner("The server refused the connection: enter a valid API key.", "error");
        openKeyDialog(storage.get("apiKey") ? ERROR_TEXT.unauthorized : "");
        return; // reconnects when a key is saved
      }
      const delay = Math.min(RECONNECT_MAX_MS, 1000 * 2 ** this.attempt);
      this.attempt += 1;
      const seconds = Math.round(delay / 1000);
      setConnection("reconnecting", `Disconnected · retrying in ${seconds} s`);
      showBanner(`Connection to the server lost. Reconnecting in ${seconds} s…`, "warning");
      this.timer = window.setTimeout(() => this.connect(), delay);
    }

    send(message) {
      if (!ready || !this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
      this.ws.send(JSON.stringify(message));
      return true;
    }

    restart() {
      this.attempt = 0;
      const old = this.ws;
      this.ws = null;
      if (old) old.close(1000, "restart");
      this.connect();
    }
  }

  const socket = new ChatSocket();

  // ------------------------------------------------------------------------------------------ conversation

  function conversationKey() {
    return `conversation.${ui.collection.value}`;
  }

  async function ensureConversation(question) {
    const existing = storage.get(conversationKey());
    if (existing) return existing;
    const created = await api("v1/conversations", {
      method: "POST",
      json: { collection: ui.collection.value, title: question.slice(0, 200) },
    });
    storage.set(conversationKey(), created.id);
    return created.id;
  }

  async function restoreConversation() {
    ui.messages.replaceChildren();
    answers.clear();
    ui.empty.hidden = false;
    const id = storage.get(conversationKey());
    if (!id || !ui.collection.value) return;
    let conversation;
    try {
      conversation = await api(`v1/conversations/${encodeURIComponent(id)}`);
    } catch (e) {
      if (e.status === 404) storage.set(conversationKey(), null);
      else showBanner(`Could not load the conversation: ${errorText(e.code, e.message)}`, "error");
      return;
    }
    for (const m of conversation.messages) {
      if (m.role === "user") {
        addUserMessage(m.content);
      } else {
        const answer = addAnswer(`history-${m.id}`, m.mode);
        answer.text = m.content;
        for (const c of m.citations || []) answer.citations.set(c.n, c);
        renderText(answer.node.querySelector(".answer-text"), answer.text, answer);
        renderSources(answer);
        setState(answer, "done", "");
      }
    }
    if (conversation.messages.length) announce(`Conversation restored: ${conversation.messages.length} messages.`);
    scrollToEnd();
  }

  async function ask(question) {
    const mode = ui.mode.value;
    const id = newId();
    addUserMessage(question);
    const answer = addAnswer(id, mode);
    running = id;
    updateComposer();
    scrollToEnd();
    let conversationId;
    try {
      conversationId = await ensureConversation(question);
    } catch (e) {
      setState(answer, "error", errorText(e.code, e.message));
      finish(answer, "The question could not be sent.");
      if (e.status === 401) openKeyDialog(ERROR_TEXT.unauthorized);
      return;
    }
    const sent = socket.send({
      type: "ask",
      id,
      question,
      collections: ui.collection.value,
      mode,
      conversation_id: conversationId,
    });
    if (!sent) {
      setState(answer, "error", "Not connected to the server; the question was not sent. It reconnects by itself.");
      finish(answer, "Not connected.");
    }
  }

  function stop() {
    if (running === null) return;
    const answer = answers.get(running);
    if (!socket.send({ type: "cancel", id: running })) return;
    if (answer) {
      answer.stopping = true;
      setState(answer, "streaming", "Stopping…");
    }
  }

  // ------------------------------------------------------------------------------------------ collections, modes, key

  /** Fills the collection picker; returns "ok", "auth" (a key is needed or was refused) or "error". */
  async function loadCollections() {
    let body;
    try {
      body = await api("v1/collections");
    } catch (e) {
      if (e.status === 401) {
        openKeyDialog(storage.get("apiKey") ? ERROR_TEXT.unauthorized : "");
        showBanner("This server needs an API key.", "error");
      } else {
        showBanner(`Could not list the collections: ${errorText(e.code, e.message)}`, "error");
      }
      ui.collection.replaceChildren(el("option", { value: "", text: "(none)" }));
      updateComposer();
      return e.status === 401 ? "auth" : "error";
    }
    const names = body.collections.map((c) => c.name);
    if (!names.length) {
      ui.collection.replaceChildren(el("option", { value: "", text: "(no collections yet)" }));
      showBanner("No collections yet: ingest documents first (rag ingest FOLDER -c NAME, or upload through the API).", "warning");
    } else {
      ui.collection.replaceChildren(
        ...body.collections.map((c) =>
          el("option", { value: c.name, text: `${c.name} (${c.documents} document${c.documents === 1 ? "" : "s"})` })),
      );
      const saved = storage.get("collection");
      ui.collection.value = names.includes(saved) ? saved : names[0];
      if (ui.banner.dataset.kind === "error") showBanner("");
    }
    updateComposer();
    return "ok";
  }

  async function loadModes() {
    // Offer only the answer modes this server accepts (from its OpenAPI schema).
    let modes = null;
    try {
      const schema = await api("openapi.json");
      const mode = schema.components.schemas.AskRequest.properties.mode;
      const variants = mode.enum ? [mode] : mode.anyOf || [];
      modes = variants.flatMap((v) => v.enum || []);
    } catch { /* keep every option */ }
    if (modes && modes.length) {
      for (const option of ui.mode.options) {
        option.disabled = !modes.includes(option.value);
        if (option.disabled && !option.textContent.endsWith("(not on this server)")) {
          option.textContent += " (not on this server)";
        }
      }
    }
    const saved = storage.get("mode");
    const option = [...ui.mode.options].find((o) => o.value === saved && !o.disabled);
    if (option) ui.mode.value = saved;
    if (ui.mode.selectedOptions[0]?.disabled) ui.mode.value = "single";
  }

  function openKeyDialog(error) {
    ui.keyError.textContent = error || "";
    ui.keyError.hidden = !error;
    if (ui.keyDialog.open) return; // keep what the user is typing
    ui.keyInput.value = storage.get("apiKey") || "";
    ui.keyDialog.showModal();
    ui.keyInput.focus();
  }

  async function onKeyDialogClose() {
    const action = ui.keyDialog.returnValue;
    if (action === "save") {
      storage.set("apiKey", ui.keyInput.value.trim());
    } else if (action === "forget") {
      storage.set("apiKey", null);
    } else {
      return;
    }
    showBanner("");
    const loaded = await loadCollections();
    if (loaded === "ok") await restoreConversation();
    if (loaded !== "auth") socket.restart();
  }

  // ------------------------------------------------------------------------------------------ wiring

  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    const question = ui.question.value.trim();
    if (!question || ui.ask.disabled) return;
    ui.question.value = "";
    ask(question);
  });
  ui.question.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ui.form.requestSubmit();
    }
  });
  ui.stop.addEventListener("click", stop);
  ui.collection.addEventListener("change", () => {
    storage.set("collection", ui.collection.value);
    restoreConversation();
    updateComposer();
  });
  ui.mode.addEventListener("change", () => storage.set("mode", ui.mode.value));
  ui.newConversation.addEventListener("click", () => {
    storage.set(conversationKey(), null);
    restoreConversation();
    announce("New conversation.");
    ui.question.focus();
  });
  ui.keyButton.addEventListener("click", () => openKeyDialog(""));
  ui.uploadButton.addEventListener("click", () => ui.uploadInput.click());
  ui.uploadInput.addEventListener("change", () => {
    uploadFiles(ui.uploadInput.files);
    ui.uploadInput.value = "";
  });
  ui.keyDialog.addEventListener("close", onKeyDialogClose);
  ui.passage.addEventListener("click", (e) => {
    if (e.target === ui.passage) ui.passage.close(); // a click on the backdrop
  });

  async function start() {
    updateComposer();
    await loadModes();
    const loaded = await loadCollections();
    if (loaded === "ok") await restoreConversation();
    // Without a valid key the socket would only be refused: it connects once a key is saved.
    if (loaded !== "auth") socket.connect();
    else setConnection("refused", "Not connected: API key needed");
  }

  // A small handle for tests and curious users; nothing on the page depends on it.
  window.ragChat = { socket, answers, uploads };
  start();
})();
