// A small multi-turn chat over the gateway's OpenAI-compatible /v1/chat/completions.
// No framework and no build step: the page ships inside the Python package as it is.
"use strict";

const $ = (selector) => document.querySelector(selector);
const ui = {
  apiKey: $("#api-key"),
  mode: $("#mode"),
  maxTokens: $("#max-tokens"),
  temperature: $("#temperature"),
  messages: $("#messages"),
  composer: $("#composer"),
  prompt: $("#prompt"),
  send: $("#send"),
  stop: $("#stop"),
  clear: $("#clear"),
};

// The conversation as the API sees it; a new chat empties it.
let history = [];
// Set while an answer streams: Stop aborts this fetch, which also cancels the request on the head.
let inFlight = null;

// Settings survive a reload. The key stays in this browser's localStorage and is only ever sent
// to this page's own origin.
const STORED = { apiKey: "flowspec.apiKey", mode: "flowspec.mode", maxTokens: "flowspec.maxTokens" };
for (const [field, key] of Object.entries(STORED)) {
  const saved = localStorage.getItem(key);
  if (saved !== null) ui[field].value = saved;
  ui[field].addEventListener("input", () => localStorage.setItem(key, ui[field].value));
}

function addMessage(role, text) {
  const article = document.createElement("article");
  article.className = `message ${role}`;
  const who = document.createElement("h2");
  who.className = "role";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "text";
  // textContent, never innerHTML: the model's output is untrusted text.
  body.textContent = text;
  article.append(who, body);
  ui.messages.append(article);
  article.scrollIntoView({ block: "end" });
  return article;
}

function setStats(article, text) {
  let line = article.querySelector(".stats");
  if (!line) {
    line = document.createElement("p");
    line.className = "stats";
    article.append(line);
  }
  line.textContent = text;
}

// "12.3 tokens/s · 2.52 accepted per verification · 48 tokens · flowspec".
// `flowspec` is the gateway's extra object with the head's statistics; `usage` is OpenAI's.
function describe(usage, flowspec, mode) {
  const parts = [];
  if (flowspec && typeof flowspec.tokens_per_s === "number") parts.push(`${flowspec.tokens_per_s.toFixed(1)} tokens/s`);
  if (flowspec && typeof flowspec.accepted_per_verification === "number") {
    parts.push(`${flowspec.accepted_per_verification.toFixed(2)} accepted per verification`);
  }
  if (usage && typeof usage.completion_tokens === "number") parts.push(`${usage.completion_tokens} tokens`);
  parts.push(mode);
  return parts.join(" · ");
}

// Server-sent events arrive in arbitrary network pieces: split on newlines, keep the unfinished
// last line for the next piece, and hand each `data:` payload to onData.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      // stream: true holds back a multi-byte character cut between two pieces.
      pending += decoder.decode(value, { stream: !done });
      const lines = pending.split(/\r?\n/);
      pending = done ? "" : lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue; // blank separators, comments, other fields
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
      if (done) return;
    }
  } finally {
    // Leaving early (an error event, a bad chunk) closes the connection, so the gateway stops too.
    reader.cancel().catch(() => {});
  }
}

// An error body in OpenAI's shape ({"error": {"message"}}) or anything else the server said.
async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return body.error?.message ?? body.detail ?? text;
  } catch {
    return text || response.statusText;
  }
}

async function ask(question) {
  const mode = ui.mode.value;
  history.push({ role: "user", content: question });
  addMessage("user", question);
  const answer = addMessage("assistant", "");
  const body = answer.querySelector(".text");
  answer.setAttribute("aria-busy", "true");
  setStats(answer, "waiting for the first token…");

  const request = {
    messages: history,
    stream: true,
    // Ask for the final usage chunk: it also carries the head's statistics (`flowspec`).
    stream_options: { include_usage: true },
    mode,
    max_tokens: Number(ui.maxTokens.value) || undefined,
    temperature: Number(ui.temperature.value) || 0,
  };
  const headers = { "Content-Type": "application/json" };
  if (ui.apiKey.value) headers.Authorization = `Bearer ${ui.apiKey.value}`;

  inFlight = new AbortController();
  setBusy(true);
  let text = "";
  let usage = null;
  let flowspec = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers, body: JSON.stringify(request), signal: inFlight.signal,
    });
    if (!response.ok) throw new Error(`${response.status}: ${await errorText(response)}`);
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message ?? String(chunk.error));
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        text += delta;
        body.textContent = text;
        answer.scrollIntoView({ block: "end" });
      }
      if (chunk.usage) usage = chunk.usage;
      if (chunk.flowspec) flowspec = chunk.flowspec;
    });
    setStats(answer, describe(usage, flowspec, mode));
  } catch (error) {
    if (error.name === "AbortError") {
      setStats(answer, `stopped · ${describe(usage, flowspec, mode)}`);
    } else {
      answer.classList.add("error");
      setStats(answer, `error: ${error.message}`);
    }
  } finally {
    // A stopped answer stays in the conversation as far as it got; a failed exchange leaves it,
    // so the next question is not asked against a question that never got an answer.
    if (text) history.push({ role: "assistant", content: text });
    else history.pop();
    answer.removeAttribute("aria-busy");
    inFlight = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  ui.clear.disabled = busy;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const question = ui.prompt.value.trim();
  if (!question || inFlight) return;
  ui.prompt.value = "";
  ask(question);
});

// Enter sends, Shift+Enter is a newline; isComposing leaves Enter to an input method (CJK).
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => inFlight?.abort());

ui.clear.addEventListener("click", () => {
  history = [];
  ui.messages.replaceChildren();
  ui.prompt.focus();
});

// The settings form has no submit action: Enter in one of its fields must not reload the page.
$("#settings").addEventListener("submit", (event) => event.preventDefault());

ui.prompt.focus();
