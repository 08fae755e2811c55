// The chat page of mlx_mla.server. Every text a person or the model wrote is put on the page
// with textContent or createTextNode, never parsed as HTML; the server's Content-Security-Policy
// also forbids inline scripts and requests to any other origin.
"use strict";

const STORE_KEY = "mlx-mla-chat";
const SETTINGS_KEY = "mlx-mla-chat-settings";

const state = {
  info: null,
  conversations: [],
  current: null,
  settings: {},
  controller: null,
  cached: {},  // conversation id: {prompt_tokens, cached_tokens}
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);  // strings become text nodes
  return node;
}

function newId() {
  return window.crypto && crypto.randomUUID ? crypto.randomUUID()
    : String(Date.now()) + Math.random().toString(16).slice(2);
}

function formatBytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

// ---- storage ----

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE_KEY) || "{}");
    state.conversations = Array.isArray(saved.conversations) ? saved.conversations : [];
    state.current = saved.current || null;
    state.settings = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
  } catch (e) {
    state.conversations = [];
  }
  if (!state.conversations.some((c) => c.id === state.current)) {
    state.current = state.conversations.length ? state.conversations[0].id : null;
  }
}

function save() {
  localStorage.setItem(STORE_KEY, JSON.stringify({
    conversations: state.conversations, current: state.current,
  }));
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(state.settings));
}

function conversation() {
  let c = state.conversations.find((c) => c.id === state.current);
  if (!c) {
    c = { id: newId(), title: "New chat", messages: [], created: Date.now() };
    state.conversations.unshift(c);
    state.current = c.id;
  }
  return c;
}

// ---- markdown, as DOM nodes ----

function renderInline(text, parent) {
  // `code`, **bold**, *italic*; everything else is text.
  const pattern = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\s][^*\n]*\*)/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    if (match.index > last) parent.append(text.slice(last, match.index));
    const token = match[0];
    if (token.startsWith("`")) parent.append(el("code", { text: token.slice(1, -1) }));
    else if (token.startsWith("**")) parent.append(el("strong", { text: token.slice(2, -2) }));
    else parent.append(el("em", { text: token.slice(1, -1) }));
    last = match.index + token.length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

function codeBlock(code, lang) {
  const copy = el("button", { type: "button", class: "copy", "aria-label": "Copy code", text: "Copy" });
  copy.addEventListener("click", () => copyText(code, copy));
  const block = el("div", { class: "codeblock" }, copy);
  if (lang) block.append(el("div", { class: "lang", text: lang }));
  block.append(el("pre", {}, el("code", { text: code })));
  return block;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no clipboard API here (an insecure origin): select and copy
    const area = el("textarea", { class: "visually-hidden" });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function renderBlocks(text, parent) {
  const lines = text.split("\n");
  let paragraph = [];
  let list = null;
  const flush = () => {
    if (paragraph.length) {
      const p = el("p");
      paragraph.forEach((line, i) => {
        if (i) p.append(el("br"));
        renderInline(line, p);
      });
      parent.append(p);
      paragraph = [];
    }
    list = null;
  };
  for (const line of lines) {
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    if (!line.trim()) {
      flush();
    } else if (heading) {
      flush();
      const h = el(`h${Math.min(heading[1].length + 2, 6)}`);
      renderInline(heading[2], h);
      parent.append(h);
    } else if (bullet || numbered) {
      const tag = bullet ? "ul" : "ol";
      if (paragraph.length) flush();
      if (!list || list.tagName.toLowerCase() !== tag) {
        list = el(tag);
        parent.append(list);
      }
      const li = el("li");
      renderInline((bullet || numbered)[1], li);
      list.append(li);
    } else if (line.startsWith(">")) {
      flush();
      const quote = el("blockquote");
      renderInline(line.replace(/^>\s?/, ""), quote);
      parent.append(quote);
    } else {
      list = null;
      paragraph.push(line);
    }
  }
  flush();
}

function renderMarkdown(text, parent) {
  // Fenced code blocks first; an unclosed fence (a reply still streaming) runs to the end.
  const fence = /^```([^\n`]*)\n([\s\S]*?)(?:^```[ \t]*$|(?![\s\S]))/gm;
  let last = 0;
  for (const match of text.matchAll(fence)) {
    renderBlocks(text.slice(last, match.index), parent);
    parent.append(codeBlock(match[2].replace(/\n$/, ""), match[1].trim()));
    last = match.index + match[0].length;
  }
  renderBlocks(text.slice(last), parent);
}

// ---- the page ----

function statsLine(stats) {
  if (!stats) return "";
  const parts = [];
  if (stats.tokens_per_s != null) parts.push(`${stats.tokens_per_s.toFixed(1)} tokens/s`);
  if (stats.completion_tokens != null) parts.push(`${stats.completion_tokens} tokens`);
  if (stats.prompt_tokens != null) {
    parts.push(`prompt ${stats.prompt_tokens} tokens, ${stats.cached_tokens ?? 0} cached`);
  }
  if (stats.accepted != null) {
    parts.push(`drafts ${stats.accepted} accepted of ${stats.accepted + stats.rejected}`);
  } else if (state.info && !state.info.drafter) {
    parts.push("no drafting");
  }
  if (stats.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function messageNode(message) {
  const node = el("article", { class: `message ${message.role}` });
  node.setAttribute("aria-label", message.role === "user" ? "You" : "Model");
  const body = el("div", { class: "body" });
  if (message.role === "user") body.textContent = message.content;
  else renderMarkdown(message.content, body);
  node.append(body);
  if (message.error) {
    node.classList.add("error");
    node.append(el("div", { class: "error-text", text: message.error }));
  }
  if (message.stats) node.append(el("div", { class: "stats", text: statsLine(message.stats) }));
  return node;
}

function renderMessages() {
  const c = conversation();
  const box = $("messages");
  box.replaceChildren(...c.messages.map(messageNode));
  box.scrollTop = box.scrollHeight;
  const last = [...c.messages].reverse().find((m) => m.stats);
  $("reply-stats").textContent = last ? `Last reply: ${statsLine(last.stats)}` : "";
  renderChart(c);
}

function renderSidebar() {
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((c) => {
    const cached = state.cached[c.id];
    let badge = "";
    if (cached && cached.prompt_tokens) {
      badge = cached.cached_tokens
        ? `cached: ${cached.cached_tokens} of ${cached.prompt_tokens} tokens`
        : `not cached (${cached.prompt_tokens} tokens)`;
    }
    const open = el("button", { type: "button", class: "open" },
      el("span", { class: "title", text: c.title }),
      el("span", { class: `badge${cached && cached.cached_tokens ? " cached" : ""}`, text: badge }));
    open.addEventListener("click", () => switchTo(c.id));
    const remove = el("button", { type: "button", class: "delete", "aria-label": `Delete ${c.title}`, text: "×" });
    remove.addEventListener("click", () => removeConversation(c.id));
    const item = el("li", {}, open, remove);
    item.dataset.id = c.id;
    if (c.id === state.current) item.setAttribute("aria-current", "true");
    return item;
  }));
}

function renderChart(c) {
  // The conversation's tokens after each reply, and the bytes our cache and standard MHA's
  // hold for them (bytes per token from the server's calculator).
  const svg = $("cache-chart");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  if (!state.info) return;
  const points = [{ tokens: 0 }];
  for (const m of c.messages) {
    if (m.stats && m.stats.total_tokens != null) points.push({ tokens: m.stats.total_tokens });
  }
  if (state.live != null && state.live.id === c.id) points.push({ tokens: state.live.tokens });
  const ours = state.info.cache.bytes_per_token;
  const mha = state.info.mha.bytes_per_token;
  const maxTokens = Math.max(1, ...points.map((p) => p.tokens));
  const maxBytes = Math.max(ours, mha) * maxTokens;
  const W = 320, H = 120, pad = 4;
  const x = (i) => pad + (W - 2 * pad) * (points.length > 1 ? i / (points.length - 1) : 0);
  const y = (bytes) => H - pad - (H - 2 * pad - 24) * (bytes / maxBytes);
  for (const [name, perToken] of [["mha", mha], ["latent", ours]]) {
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("class", name);
    line.setAttribute("points", points.map((p, i) => `${x(i)},${y(p.tokens * perToken)}`).join(" "));
    svg.append(line);
  }
  const tokens = points[points.length - 1].tokens;
  const bits = state.info.cache.kv_bits ? ` ${state.info.cache.kv_bits}-bit` : "";
  const labels = [
    ["latent", `${state.info.attention.toUpperCase()}${bits}: ${formatBytes(tokens * ours)}`, 12],
    ["mha", `standard MHA: ${formatBytes(tokens * mha)} (${(mha / ours).toFixed(1)}x)`, 23],
  ];
  for (const [name, text, top] of labels) {
    const label = document.createElementNS(ns, "text");
    label.setAttribute("class", name);
    label.setAttribute("x", "6");
    label.setAttribute("y", String(top));
    label.textContent = text;
    svg.append(label);
  }
  $("chart-caption").textContent =
    `Cache bytes of this conversation, ${tokens} tokens: ours against standard MHA's`;
}

function renderInfo() {
  const info = state.info;
  $("model-name").textContent = info.model;
  $("model-context").textContent = `context ${info.context} tokens`;
  const bits = info.cache.kv_bits ? `, ${info.cache.kv_bits}-bit` : "";
  $("model-cache").textContent =
    `cache ${formatBytes(info.cache.bytes_per_token)}/token (${info.attention}${bits}) vs ` +
    `MHA ${formatBytes(info.mha.bytes_per_token)}/token`;
  for (const node of document.querySelectorAll(".drafting")) {
    node.classList.toggle("hidden", !info.drafter);
  }
}

function applySettingsToForm() {
  const d = (state.info && state.info.defaults) || {};
  const s = state.settings;
  $("temperature").value = s.temperature ?? d.temperature ?? 0;
  $("top-p").value = s.top_p ?? d.top_p ?? 1;
  $("max-tokens").value = s.max_tokens ?? d.max_tokens ?? 512;
  $("system").value = s.system ?? "";
  $("draft-tokens").value = s.num_draft_tokens ?? (state.info && state.info.num_draft_tokens) ?? "";
}

function readSettings() {
  const number = (id) => {
    const v = parseFloat($(id).value);
    return Number.isFinite(v) ? v : undefined;
  };
  state.settings = {
    temperature: number("temperature"),
    top_p: number("top-p"),
    max_tokens: number("max-tokens") != null ? Math.round(number("max-tokens")) : undefined,
    system: $("system").value,
    num_draft_tokens: number("draft-tokens") != null
      ? Math.max(1, Math.round(number("draft-tokens"))) : undefined,
  };
  save();
}

function requestMessages(c) {
  const messages = c.messages.filter((m) => !m.error || m.content)
    .map((m) => ({ role: m.role, content: m.content }));
  const system = state.settings.system;
  return system ? [{ role: "system", content: system }, ...messages] : messages;
}

async function refreshCached(c) {
  if (!c.messages.length) return;
  try {
    const r = await fetch("/v1/mla/cached", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages: requestMessages(c) }),
    });
    if (r.ok) state.cached[c.id] = await r.json();
  } catch (e) {
    delete state.cached[c.id];
  }
  renderSidebar();
}

async function send(text) {
  const c = conversation();
  readSettings();
  c.messages.push({ role: "user", content: text });
  if (c.title === "New chat") c.title = text.slice(0, 40) || "New chat";
  const reply = { role: "assistant", content: "" };
  const body = {
    model: state.info ? state.info.model : "default_model",
    messages: requestMessages(c),
    stream: true,
    stream_options: { include_usage: true },
  };
  for (const key of ["temperature", "top_p", "max_tokens"]) {
    if (state.settings[key] != null) body[key] = state.settings[key];
  }
  if (state.info && state.info.drafter && state.settings.num_draft_tokens != null) {
    body.num_draft_tokens = state.settings.num_draft_tokens;
  }
  c.messages.push(reply);
  save();
  renderSidebar();
  renderMessages();
  const node = $("messages").lastElementChild;
  const bodyNode = node.querySelector(".body");
  state.controller = new AbortController();
  setBusy(true);
  const base = c.messages.length > 2 ? lastTotal(c) : 0;
  let chunks = 0, first = null, lastAt = null, usage = null, stopped = false;
  let frame = null;
  const draw = () => {
    frame = null;
    bodyNode.replaceChildren();
    renderMarkdown(reply.content, bodyNode);
    state.live = { id: c.id, tokens: base + chunks };
    renderChart(c);
    $("messages").scrollTop = $("messages").scrollHeight;
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || `HTTP ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;  // ": keepalive" comments
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            const now = performance.now();
            if (first === null) first = now;
            lastAt = now;
            chunks += 1;
            reply.content += delta.content;
            if (frame === null) frame = requestAnimationFrame(draw);
          }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else reply.error = String(e.message || e);
  } finally {
    if (frame !== null) cancelAnimationFrame(frame);
    state.controller = null;
    state.live = null;
    setBusy(false);
  }
  const completion = usage ? usage.completion_tokens : chunks;
  const stats = { completion_tokens: completion, stopped };
  if (first !== null && lastAt > first && completion > 1) {
    stats.tokens_per_s = (completion - 1) / ((lastAt - first) / 1000);
  }
  if (usage) {
    stats.prompt_tokens = usage.prompt_tokens;
    stats.cached_tokens = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
    stats.total_tokens = usage.total_tokens;
    const details = usage.completion_tokens_details;
    if (details && details.accepted_prediction_tokens != null) {
      stats.accepted = details.accepted_prediction_tokens;
      stats.rejected = details.rejected_prediction_tokens;
    }
  } else {
    stats.total_tokens = base + chunks;
  }
  reply.stats = stats;
  save();
  renderMessages();
  refreshCached(c);
}

function lastTotal(c) {
  for (let i = c.messages.length - 1; i >= 0; i -= 1) {
    const s = c.messages[i].stats;
    if (s && s.total_tokens != null) return s.total_tokens;
  }
  return 0;
}

function stop() {
  if (state.controller) state.controller.abort();
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.dataset.busy = busy ? "true" : "false";
}

function switchTo(id) {
  if (state.controller) return;
  state.current = id;
  save();
  renderSidebar();
  renderMessages();
  refreshCached(conversation());
}

function newChat() {
  if (state.controller) return;
  const c = conversation();
  if (c.messages.length) {
    state.current = null;
    conversation();
  }
  save();
  renderSidebar();
  renderMessages();
  $("prompt").focus();
}

function removeConversation(id) {
  if (state.controller) return;
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.current === id) state.current = state.conversations.length ? state.conversations[0].id : null;
  save();
  renderSidebar();
  renderMessages();
}

async function start() {
  load();
  try {
    const r = await fetch("/v1/mla/info");
    state.info = await r.json();
    renderInfo();
  } catch (e) {
    $("model-name").textContent = "the server does not answer";
  }
  applySettingsToForm();
  conversation();
  renderSidebar();
  renderMessages();
  setBusy(false);
  for (const c of state.conversations) refreshCached(c);

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value;
    if (!text.trim() || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.controller) {
      event.preventDefault();
      stop();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  for (const id of ["temperature", "top-p", "max-tokens", "system", "draft-tokens"]) {
    $(id).addEventListener("change", readSettings);
  }
  $("prompt").focus();
}

document.addEventListener("DOMContentLoaded", start);
