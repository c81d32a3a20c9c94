/* PhotonInfer chat page.
 *
 * Plain JavaScript, no framework, no network access other than this server:
 *   POST /v1/chat/completions  (stream: true, SSE)  — answers, token by token
 *   GET  /v1/models                                  — model id for requests
 *   GET  /api/engine                                  — live engine panel, polled every second
 * Conversations and settings live in localStorage.
 */
"use strict";

(function () {
  // ---------------------------------------------------------------- storage
  const LS_CONVERSATIONS = "photoninfer.conversations.v1";
  const LS_CURRENT = "photoninfer.current.v1";
  const LS_SETTINGS = "photoninfer.settings.v1";
  const DEFAULT_SETTINGS = { systemPrompt: "", temperature: 0.7, maxTokens: 512, apiKey: "" };
  const ENGINE_POLL_MS = 1000;

  function loadJson(key, fallback) {
    try {
      const raw = localStorage.getItem(key);
      return raw === null ? fallback : JSON.parse(raw);
    } catch (e) {
      console.warn("ignoring unreadable localStorage entry", key, e);
      return fallback;
    }
  }

  function saveJson(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch (e) {
      console.warn("could not save to localStorage", key, e);
    }
  }

  let settings = Object.assign({}, DEFAULT_SETTINGS, loadJson(LS_SETTINGS, {}));
  let conversations = loadJson(LS_CONVERSATIONS, []);
  if (!Array.isArray(conversations)) conversations = [];
  conversations = conversations.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages));
  // A reload in the middle of an answer leaves a pending message behind: mark it as interrupted.
  for (const c of conversations) {
    for (const m of c.messages) {
      if (m.pending) {
        m.pending = false;
        m.stopped = true;
      }
    }
  }
  let currentId = loadJson(LS_CURRENT, null);
  if (!conversations.some((c) => c.id === currentId)) currentId = conversations.length ? conversations[0].id : null;

  let saveTimer = null;
  function saveConversations(now) {
    if (saveTimer !== null) {
      clearTimeout(saveTimer);
      saveTimer = null;
    }
    const write = () => {
      saveTimer = null;
      saveJson(LS_CONVERSATIONS, conversations);
      saveJson(LS_CURRENT, currentId);
    };
    if (now) write();
    else saveTimer = setTimeout(write, 400);
  }
  window.addEventListener("beforeunload", () => saveConversations(true));

  // ---------------------------------------------------------------- state
  let modelId = null; // from GET /v1/models
  let engineModel = null; // from GET /api/engine
  let active = null; // the in-flight answer: {conv, msg, controller}
  const msgElements = new WeakMap(); // message object -> its DOM element (never persisted)

  const $ = (id) => document.getElementById(id);
  const els = {
    sidebar: $("sidebar"),
    backdrop: $("sidebar-backdrop"),
    sidebarToggle: $("sidebar-toggle"),
    newChat: $("new-chat"),
    list: $("conversation-list"),
    title: $("conversation-title"),
    modelName: $("model-name"),
    messages: $("messages"),
    composer: $("composer"),
    input: $("message-input"),
    send: $("send-button"),
    stop: $("stop-button"),
    settingsButton: $("settings-button"),
    settingsPanel: $("settings-panel"),
    settingsClose: $("settings-close"),
    systemPrompt: $("system-prompt"),
    temperature: $("temperature"),
    maxTokens: $("max-tokens"),
    apiKey: $("api-key"),
    engineState: $("engine-state"),
    engineRunning: $("engine-running"),
    engineWaiting: $("engine-waiting"),
    engineTps: $("engine-tps"),
    engineKv: $("engine-kv"),
    engineKvBar: $("engine-kv-bar"),
    engineKvFill: $("engine-kv-fill"),
    engineModel: $("engine-model"),
  };

  function newId() {
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  }

  function currentConversation() {
    return conversations.find((c) => c.id === currentId) || null;
  }

  // ---------------------------------------------------------------- markdown
  // Safe by construction: every piece of model text is HTML-escaped before any markup is added,
  // and the only markup added is a fixed set of tags (plus http(s) links with escaped URLs).
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  // `text` is already escaped. Code spans and links are set aside as placeholders first so that
  // emphasis markers inside them are left alone.
  function renderInline(text) {
    const held = [];
    const hold = (html) => "\u0000" + (held.push(html) - 1) + "\u0000";
    let s = text.replace(/`([^`\n]+)`/g, (m, code) => hold("<code>" + code + "</code>"));
    s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s()]+)\)/g, (m, label, url) =>
      hold('<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + label + "</a>"));
    s = s.replace(/\*\*(?=\S)([^\n]*?\S)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^\w])__(?=\S)([^\n]*?\S)__(?!\w)/g, "$1<strong>$2</strong>");
    s = s.replace(/(^|[^*\w])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>");
    s = s.replace(/(^|[^_\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?![_\w])/g, "$1<em>$2</em>");
    return s.replace(/\u0000(\d+)\u0000/g, (m, i) => held[+i]);
  }

  function inline(raw) {
    return renderInline(escapeHtml(raw));
  }

  // items: [{indent, type: "ul"|"ol", start, text}] -> nested lists by indentation.
  function renderList(items) {
    let html = "";
    const stack = [];
    const open = (it) => {
      html += "<" + it.type + (it.type === "ol" && it.start !== 1 ? ' start="' + it.start + '"' : "") + ">";
      stack.push({ indent: it.indent, type: it.type });
    };
    for (const it of items) {
      while (stack.length > 1 && it.indent < stack[stack.length - 1].indent) {
        html += "</li></" + stack.pop().type + ">";
      }
      const top = stack[stack.length - 1];
      if (!top || it.indent > top.indent) {
        open(it);
      } else if (top.type !== it.type) {
        html += "</li></" + stack.pop().type + ">";
        open(it);
      } else {
        html += "</li>";
      }
      html += "<li>" + inline(it.text);
    }
    while (stack.length) html += "</li></" + stack.pop().type + ">";
    return html;
  }

  function renderMarkdown(src) {
    const lines = String(src).replace(/\u0000/g, "").replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let para = [];
    let list = [];
    let quote = [];
    const flushPara = () => {
      if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    };
    const flushList = () => {
      if (list.length) out.push(renderList(list));
      list = [];
    };
    const flushQuote = () => {
      if (quote.length) out.push("<blockquote>" + renderMarkdown(quote.join("\n")) + "</blockquote>");
      quote = [];
    };
    const flushAll = () => {
      flushPara();
      flushList();
      flushQuote();
    };

    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/);
      if (fence) {
        flushAll();
        const marker = fence[1];
        const code = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(marker)) code.push(lines[i++]);
        // An unclosed fence (answer still streaming) runs to the end.
        const lang = fence[2] ? ' data-lang="' + escapeHtml(fence[2]) + '"' : "";
        out.push("<pre" + lang + "><code>" + escapeHtml(code.join("\n")) + "</code></pre>");
        continue;
      }
      if (!line.trim()) {
        flushPara();
        flushQuote();
        // a blank line inside a list keeps the list open if the next line continues it
        continue;
      }
      const quoteLine = line.match(/^\s{0,3}>\s?(.*)$/);
      if (quoteLine) {
        flushPara();
        flushList();
        quote.push(quoteLine[1]);
        continue;
      }
      flushQuote();
      const heading = line.match(/^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/);
      if (heading) {
        flushAll();
        const level = heading[1].length;
        out.push("<h" + level + ">" + inline(heading[2]) + "</h" + level + ">");
        continue;
      }
      if (/^\s{0,3}([-*_])(\s*\1){2,}\s*$/.test(line)) {
        flushAll();
        out.push("<hr>");
        continue;
      }
      const item = line.match(/^(\s*)([-*+]|(\d{1,9})[.)])\s+(.*)$/);
      if (item) {
        flushPara();
        list.push({
          indent: item[1].replace(/\t/g, "    ").length,
          type: item[3] !== undefined ? "ol" : "ul",
          start: item[3] !== undefined ? parseInt(item[3], 10) : 1,
          text: item[4],
        });
        continue;
      }
      if (list.length && /^\s+\S/.test(line) && !para.length) {
        list[list.length - 1].text += " " + line.trim(); // continuation of the last item
        continue;
      }
      flushList();
      para.push(line);
    }
    flushAll();
    return out.join("\n");
  }

  // ---------------------------------------------------------------- rendering
  function formatNumber(x, digits) {
    return Number.isFinite(x) ? x.toFixed(digits) : "–";
  }

  function formatMs(ms) {
    if (!Number.isFinite(ms)) return "–";
    return ms < 1000 ? Math.round(ms) + " ms" : (ms / 1000).toFixed(2) + " s";
  }

  function renderStats(msg, statsEl) {
    const st = msg.stats;
    statsEl.textContent = "";
    if (!st) {
      statsEl.hidden = true;
      return;
    }
    statsEl.hidden = false;
    statsEl.dataset.final = msg.pending ? "false" : "true";
    const parts = [
      ["tokens", st.tokens + (st.tokens === 1 ? " token" : " tokens"), "generated tokens"],
      ["tps", formatNumber(st.tokensPerSecond, 1) + " tok/s", "decode speed: tokens after the first / time after the first token"],
      ["ttft", "TTFT " + formatMs(st.ttftMs), "time to first token"],
    ];
    if (!msg.pending) parts.push(["total", formatMs(st.totalMs) + " total", "time from sending to the last token"]);
    if (msg.stopped) parts.push(["finish", "stopped", "the request was stopped"]);
    else if (st.finishReason && st.finishReason !== "stop") parts.push(["finish", "finish: " + st.finishReason, "finish_reason"]);
    parts.forEach(([key, text, title], i) => {
      if (i) statsEl.appendChild(document.createTextNode(" · "));
      const span = document.createElement("span");
      span.dataset.stat = key;
      span.className = "stat stat-" + key;
      span.textContent = text;
      span.title = title;
      statsEl.appendChild(span);
    });
  }

  function buildMessageElement(msg) {
    const el = document.createElement("div");
    const role = msg.role === "error" ? "error" : msg.role;
    el.className = "message " + role;
    el.dataset.testid = "message-" + role;
    const avatar = document.createElement("div");
    avatar.className = "avatar";
    avatar.setAttribute("aria-hidden", "true");
    avatar.textContent = role === "user" ? "You" : role === "error" ? "!" : "AI";
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    const content = document.createElement("div");
    content.className = "content";
    bubble.appendChild(content);
    if (role === "assistant") {
      const stats = document.createElement("div");
      stats.className = "answer-stats";
      stats.dataset.testid = "answer-stats";
      bubble.appendChild(stats);
    }
    el.appendChild(avatar);
    el.appendChild(bubble);
    msgElements.set(msg, el);
    updateMessageElement(msg);
    return el;
  }

  function updateMessageElement(msg) {
    const el = msgElements.get(msg);
    if (!el) return;
    const content = el.querySelector(".content");
    if (msg.role === "assistant") {
      el.classList.toggle("pending", !!msg.pending);
      el.classList.toggle("stopped", !!msg.stopped);
      if (msg.pending && !msg.content) {
        content.className = "content markdown";
        content.innerHTML = '<span class="typing" aria-label="waiting for the first token"><i></i><i></i><i></i></span>';
      } else {
        content.className = "content markdown" + (msg.pending ? " streaming" : "");
        // renderMarkdown escapes all model text before adding markup.
        content.innerHTML = renderMarkdown(msg.content);
      }
      renderStats(msg, el.querySelector(".answer-stats"));
    } else {
      content.className = "content plain";
      content.textContent = msg.content;
    }
  }

  function renderEmptyState() {
    const wrap = document.createElement("div");
    wrap.className = "empty-state";
    wrap.dataset.testid = "empty-state";
    const h = document.createElement("h1");
    h.textContent = "What can I help with?";
    const p = document.createElement("p");
    p.textContent = "Answers stream from " + (modelId || engineModel || "the model") + " running on PhotonInfer.";
    const chips = document.createElement("div");
    chips.className = "suggestions";
    for (const s of ["Explain paged attention in two sentences.", "Write a haiku about GPUs.", "Give me three tips for writing clear Python."]) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "chip";
      b.textContent = s;
      b.addEventListener("click", () => {
        els.input.value = s;
        autoGrow();
        els.input.focus();
      });
      chips.appendChild(b);
    }
    wrap.append(h, p, chips);
    return wrap;
  }

  function renderMessages() {
    const conv = currentConversation();
    els.messages.textContent = "";
    els.title.textContent = conv ? conv.title : "New chat";
    document.title = (conv ? conv.title + " · " : "") + "PhotonInfer Chat";
    if (!conv || !conv.messages.length) {
      els.messages.appendChild(renderEmptyState());
      return;
    }
    for (const msg of conv.messages) els.messages.appendChild(buildMessageElement(msg));
    els.messages.scrollTop = els.messages.scrollHeight;
  }

  function renderSidebar() {
    els.list.textContent = "";
    const sorted = conversations.slice().sort((a, b) => (b.updated || 0) - (a.updated || 0));
    for (const conv of sorted) {
      const li = document.createElement("li");
      li.className = "conversation-item" + (conv.id === currentId ? " active" : "");
      li.dataset.id = conv.id;
      li.dataset.testid = "conversation-item";
      const open = document.createElement("button");
      open.type = "button";
      open.className = "conversation-open";
      open.textContent = conv.title;
      open.title = conv.title;
      if (conv.id === currentId) open.setAttribute("aria-current", "true");
      open.addEventListener("click", () => switchConversation(conv.id));
      const del = document.createElement("button");
      del.type = "button";
      del.className = "conversation-delete";
      del.dataset.testid = "delete-conversation";
      del.setAttribute("aria-label", "Delete conversation " + conv.title);
      del.title = "Delete (click twice)";
      del.textContent = "×";
      let confirmTimer = null;
      del.addEventListener("click", (ev) => {
        ev.stopPropagation();
        if (del.dataset.confirm === "1") {
          clearTimeout(confirmTimer);
          deleteConversation(conv.id);
          return;
        }
        del.dataset.confirm = "1";
        del.textContent = "Delete?";
        confirmTimer = setTimeout(() => {
          del.dataset.confirm = "";
          del.textContent = "×";
        }, 3000);
      });
      li.append(open, del);
      els.list.appendChild(li);
    }
  }

  function renderAll() {
    renderSidebar();
    renderMessages();
  }

  let pendingUpdates = new Set();
  let frameRequested = false;
  function scheduleUpdate(msg) {
    pendingUpdates.add(msg);
    if (frameRequested) return;
    frameRequested = true;
    requestAnimationFrame(() => {
      frameRequested = false;
      const nearBottom = els.messages.scrollHeight - els.messages.scrollTop - els.messages.clientHeight < 80;
      for (const m of pendingUpdates) updateMessageElement(m);
      pendingUpdates = new Set();
      if (nearBottom) els.messages.scrollTop = els.messages.scrollHeight;
    });
  }

  // ---------------------------------------------------------------- conversations
  function switchConversation(id) {
    currentId = id;
    saveConversations(true);
    closeSidebar();
    renderAll();
    els.input.focus();
  }

  function newChat() {
    currentId = null;
    saveConversations(true);
    closeSidebar();
    renderAll();
    els.input.focus();
  }

  function deleteConversation(id) {
    if (active && active.conv.id === id) active.controller.abort();
    conversations = conversations.filter((c) => c.id !== id);
    if (currentId === id) currentId = null;
    saveConversations(true);
    renderAll();
  }

  function makeTitle(text) {
    const t = text.replace(/\s+/g, " ").trim();
    return t.length > 48 ? t.slice(0, 47) + "…" : t || "New chat";
  }

  // ---------------------------------------------------------------- API
  function authHeaders(extra) {
    const h = Object.assign({}, extra || {});
    if (settings.apiKey) h["Authorization"] = "Bearer " + settings.apiKey;
    return h;
  }

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  async function errorFromResponse(resp) {
    let message = "";
    try {
      const text = await resp.text();
      try {
        const j = JSON.parse(text);
        if (j && j.error) message = typeof j.error === "string" ? j.error : j.error.message || JSON.stringify(j.error);
        else if (j && j.detail) message = typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail);
        else message = text;
      } catch (e) {
        message = text;
      }
    } catch (e) {
      /* body unreadable */
    }
    message = (message || resp.statusText || "request failed").trim();
    if (resp.status === 401) message += " — enter the server's API key in Settings.";
    return new ApiError("HTTP " + resp.status + ": " + message, resp.status);
  }

  async function loadModels() {
    try {
      const resp = await fetch("/v1/models", { headers: authHeaders(), cache: "no-store" });
      if (!resp.ok) throw await errorFromResponse(resp);
      const j = await resp.json();
      if (j && Array.isArray(j.data) && j.data.length && j.data[0].id) {
        modelId = j.data[0].id;
        els.modelName.textContent = modelId;
        els.modelName.title = modelId;
        if (!currentConversation()) renderMessages();
      }
    } catch (e) {
      els.modelName.textContent = e.status === 401 ? "API key needed" : "model unavailable";
      els.modelName.title = String(e.message || e);
    }
  }

  // Yields the data payload of each server-sent event in a fetch response body.
  async function* sseData(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    const boundary = /\r\n\r\n|\n\n|\r\r/;
    const parse = (raw) => {
      const data = [];
      for (const line of raw.split(/\r\n|\n|\r/)) {
        if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      return data.length ? data.join("\n") : null;
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let m;
        while ((m = boundary.exec(buf)) !== null) {
          const raw = buf.slice(0, m.index);
          buf = buf.slice(m.index + m[0].length);
          const data = parse(raw);
          if (data !== null) yield data;
        }
      }
      buf += decoder.decode();
      const data = parse(buf);
      if (data !== null) yield data;
    } finally {
      reader.releaseLock();
    }
  }

  function buildRequestMessages(conv, upTo) {
    const msgs = [];
    if (settings.systemPrompt.trim()) msgs.push({ role: "system", content: settings.systemPrompt });
    for (const m of conv.messages) {
      if (m === upTo) break;
      if (m.role !== "user" && m.role !== "assistant") continue; // error notes are not part of the chat
      if (m.role === "assistant" && !m.content) continue;
      msgs.push({ role: m.role, content: m.content });
    }
    return msgs;
  }

  function computeStats(msg, t) {
    const tokens = t.usage && Number.isFinite(t.usage.completion_tokens) ? t.usage.completion_tokens : t.chunks;
    const ttftMs = t.first === null ? NaN : t.first - t.start;
    const totalMs = t.end - t.start;
    let tokensPerSecond = NaN;
    if (t.first !== null && tokens > 1 && t.end > t.first) tokensPerSecond = ((tokens - 1) * 1000) / (t.end - t.first);
    else if (tokens > 0 && totalMs > 0) tokensPerSecond = (tokens * 1000) / totalMs;
    msg.stats = {
      tokens,
      tokensPerSecond,
      ttftMs,
      totalMs,
      promptTokens: t.usage ? t.usage.prompt_tokens : undefined,
      finishReason: t.finish,
    };
  }

  async function sendMessage(text) {
    if (active || !text.trim()) return;
    let conv = currentConversation();
    if (!conv) {
      conv = { id: newId(), title: makeTitle(text), messages: [], created: Date.now(), updated: Date.now() };
      conversations.push(conv);
      currentId = conv.id;
    }
    conv.messages.push({ role: "user", content: text });
    const msg = { role: "assistant", content: "", pending: true };
    conv.messages.push(msg);
    conv.updated = Date.now();
    const controller = new AbortController();
    active = { conv, msg, controller };
    setGenerating(true);
    saveConversations(true);
    renderAll();

    const t = { start: performance.now(), first: null, end: 0, chunks: 0, usage: null, finish: null };
    let error = null;
    try {
      if (!modelId) await loadModels();
      const body = {
        messages: buildRequestMessages(conv, msg),
        stream: true,
        stream_options: { include_usage: true },
      };
      const model = modelId || engineModel;
      if (model) body.model = model;
      const temperature = parseFloat(settings.temperature);
      if (Number.isFinite(temperature)) body.temperature = temperature;
      const maxTokens = parseInt(settings.maxTokens, 10);
      if (Number.isFinite(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;

      const resp = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!resp.ok) throw await errorFromResponse(resp);
      const type = resp.headers.get("content-type") || "";
      if (!resp.body || type.includes("application/json")) {
        // A server that ignored stream: true — show the whole answer at once.
        const j = await resp.json();
        if (j.error) throw new ApiError(j.error.message || JSON.stringify(j.error));
        const choice = j.choices && j.choices[0];
        msg.content = (choice && choice.message && choice.message.content) || "";
        t.first = performance.now();
        t.usage = j.usage || null;
        t.finish = choice ? choice.finish_reason : null;
      } else {
        for await (const data of sseData(resp)) {
          if (data.trim() === "[DONE]") break;
          let chunk;
          try {
            chunk = JSON.parse(data);
          } catch (e) {
            console.warn("unparsable SSE chunk", data);
            continue;
          }
          if (chunk.error) {
            throw new ApiError(typeof chunk.error === "string" ? chunk.error : chunk.error.message || JSON.stringify(chunk.error));
          }
          const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : null;
          if (choice) {
            const piece = choice.delta && typeof choice.delta.content === "string" ? choice.delta.content : "";
            if (piece) {
              if (t.first === null) t.first = performance.now();
              msg.content += piece;
              t.chunks++;
            }
            if (choice.finish_reason) t.finish = choice.finish_reason;
          }
          if (chunk.usage) t.usage = chunk.usage;
          t.end = performance.now();
          computeStats(msg, t);
          scheduleUpdate(msg);
          saveConversations(false);
        }
      }
    } catch (e) {
      if (e && e.name === "AbortError") {
        msg.stopped = true;
      } else if (e instanceof ApiError) {
        error = e;
      } else {
        error = new ApiError("Could not reach the server: " + (e && e.message ? e.message : String(e)));
      }
    } finally {
      t.end = performance.now();
      msg.pending = false;
      if (msg.content || t.usage || msg.stopped) computeStats(msg, t);
      if (error) {
        if (!msg.content) conv.messages.splice(conv.messages.indexOf(msg), 1);
        conv.messages.push({ role: "error", content: error.message });
        if (error.status === 401) openSettings(els.apiKey);
      }
      conv.updated = Date.now();
      active = null;
      setGenerating(false);
      saveConversations(true);
      if (conversations.includes(conv) && conv.id === currentId) {
        if (error) renderMessages();
        else updateMessageElement(msg);
      }
      renderSidebar();
    }
  }

  function setGenerating(on) {
    els.send.hidden = on;
    els.send.disabled = on;
    els.stop.hidden = !on;
    document.body.classList.toggle("generating", on);
  }

  // ---------------------------------------------------------------- engine panel
  function setEngineState(state, text) {
    els.engineState.dataset.state = state;
    els.engineState.textContent = text;
  }

  async function pollEngine() {
    try {
      if (document.visibilityState !== "hidden") {
        const resp = await fetch("/api/engine", { headers: authHeaders(), cache: "no-store" });
        if (resp.status === 401) {
          setEngineState("auth", "API key needed");
        } else if (!resp.ok) {
          setEngineState("error", "HTTP " + resp.status);
        } else {
          const e = await resp.json();
          const int = (x) => (Number.isFinite(x) ? String(Math.round(x)) : "–");
          els.engineRunning.textContent = int(e.running);
          els.engineWaiting.textContent = int(e.waiting);
          els.engineTps.textContent = formatNumber(e.generation_tokens_per_s, 1);
          const used = Number(e.kv_blocks_used);
          const total = Number(e.kv_blocks_total);
          els.engineKv.textContent = int(used) + " / " + int(total);
          const pct = total > 0 ? Math.min(100, Math.max(0, (100 * used) / total)) : 0;
          els.engineKvFill.style.width = pct.toFixed(1) + "%";
          els.engineKvBar.setAttribute("aria-valuenow", pct.toFixed(0));
          els.engineKvBar.classList.toggle("high", pct >= 85);
          if (e.model) {
            engineModel = String(e.model);
            els.engineModel.textContent = engineModel;
            els.engineModel.title = engineModel;
            if (!modelId) els.modelName.textContent = engineModel;
          }
          setEngineState(e.running > 0 || e.waiting > 0 ? "busy" : "idle", e.running > 0 || e.waiting > 0 ? "busy" : "idle");
        }
      }
    } catch (err) {
      setEngineState("offline", "offline");
    } finally {
      setTimeout(pollEngine, ENGINE_POLL_MS);
    }
  }

  // ---------------------------------------------------------------- settings
  function openSettings(focusEl) {
    els.settingsPanel.hidden = false;
    els.settingsButton.setAttribute("aria-expanded", "true");
    (focusEl || els.systemPrompt).focus();
  }

  function closeSettings() {
    els.settingsPanel.hidden = true;
    els.settingsButton.setAttribute("aria-expanded", "false");
  }

  function bindSettings() {
    els.systemPrompt.value = settings.systemPrompt;
    els.temperature.value = settings.temperature;
    els.maxTokens.value = settings.maxTokens;
    els.apiKey.value = settings.apiKey;
    const update = () => {
      settings.systemPrompt = els.systemPrompt.value;
      const temp = parseFloat(els.temperature.value);
      settings.temperature = Number.isFinite(temp) ? Math.min(2, Math.max(0, temp)) : DEFAULT_SETTINGS.temperature;
      const mt = parseInt(els.maxTokens.value, 10);
      // blank = no limit: the server then generates up to the end of the context
      settings.maxTokens = Number.isFinite(mt) && mt > 0 ? mt : els.maxTokens.value.trim() === "" ? "" : DEFAULT_SETTINGS.maxTokens;
      const keyChanged = settings.apiKey !== els.apiKey.value.trim();
      settings.apiKey = els.apiKey.value.trim();
      saveJson(LS_SETTINGS, settings);
      if (keyChanged) loadModels();
    };
    for (const el of [els.systemPrompt, els.temperature, els.maxTokens, els.apiKey]) {
      el.addEventListener("input", update);
      el.addEventListener("change", update);
    }
    els.settingsButton.addEventListener("click", () => (els.settingsPanel.hidden ? openSettings() : closeSettings()));
    els.settingsClose.addEventListener("click", closeSettings);
  }

  // ---------------------------------------------------------------- layout bits
  function openSidebar() {
    els.sidebar.classList.add("open");
    els.backdrop.hidden = false;
  }

  function closeSidebar() {
    els.sidebar.classList.remove("open");
    els.backdrop.hidden = true;
  }

  function autoGrow() {
    els.input.style.height = "auto";
    els.input.style.height = Math.min(els.input.scrollHeight, 220) + "px";
  }

  function submitInput() {
    const text = els.input.value;
    if (!text.trim() || active) return;
    els.input.value = "";
    autoGrow();
    sendMessage(text);
  }

  els.composer.addEventListener("submit", (ev) => {
    ev.preventDefault();
    submitInput();
  });
  els.input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      submitInput();
    }
  });
  els.input.addEventListener("input", autoGrow);
  els.stop.addEventListener("click", () => {
    if (active) active.controller.abort();
  });
  els.newChat.addEventListener("click", newChat);
  els.sidebarToggle.addEventListener("click", () => (els.sidebar.classList.contains("open") ? closeSidebar() : openSidebar()));
  els.backdrop.addEventListener("click", closeSidebar);
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") {
      closeSettings();
      closeSidebar();
    }
  });

  // Exposed for tests and curious users; not used by the page itself.
  window.PhotonInferChat = { renderMarkdown, escapeHtml };

  bindSettings();
  setGenerating(false);
  renderAll();
  loadModels();
  pollEngine();
  els.input.focus();
})();
