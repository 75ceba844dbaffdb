// exocortex chat page: streams replies from /v1/chat/completions (fetch + SSE parsing), no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop");

// The conversation, in the API's format. Assistant turns keep their parts (text / tool_call / tool_output),
// so the model sees its own tool calls as tool calls when the history is sent back.
let history = [];
let modelName = null;
let controller = null;  // AbortController of the reply being generated
let chatId = 0;          // bumped by "New chat", so a reply that ends afterwards is not added to the new chat

// The server's API key, asked for when it answers 401 (started with --api-key); kept for this tab only.
let apiKey = sessionStorage.getItem("exocortex-api-key") || "";

function authHeaders() {
  return apiKey ? { Authorization: "Bearer " + apiKey } : {};
}

function askForKey() {
  const key = window.prompt("This server needs an API key (exocortex serve --api-key):");
  if (key) {
    apiKey = key.trim();
    sessionStorage.setItem("exocortex-api-key", apiKey);
  }
  return Boolean(key);
}

async function loadModel() {
  try {
    let res = await fetch("/v1/models", { headers: authHeaders() });
    while (res.status === 401 && askForKey()) res = await fetch("/v1/models", { headers: authHeaders() });
    const body = await res.json();
    modelName = body.data[0].id;
    $("model").textContent = modelName;
  } catch (e) {
    $("model").textContent = "(model unavailable)";
  }
}

function scrollDown(force) {
  const near = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  if (force || near) log.scrollTop = log.scrollHeight;
}

function addMessage(role) {
  $("empty").hidden = true;
  const row = document.createElement("div");
  row.className = "msg " + role;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  row.appendChild(bubble);
  log.appendChild(row);
  scrollDown(true);
  return bubble;
}

function addNote(bubble, text, isError) {
  const note = document.createElement("span");
  note.className = "note" + (isError ? " error" : "");
  note.textContent = text;
  bubble.appendChild(note);
}

// One assistant reply being built from streamed deltas: parts[i] = {type, text}, shown as elements.
class Reply {
  constructor(bubble) {
    this.bubble = bubble;
    this.parts = [];
    this.elements = [];
    bubble.classList.add("cursor");
  }
  apply(part) {
    let el = this.elements[part.index];
    if (!el) {
      this.parts[part.index] = { type: part.type, text: "" };
      el = document.createElement(part.type === "text" ? "span" : "div");
      el.className = part.type === "text" ? "text" : "tool " + (part.type === "tool_call" ? "call" : "output");
      this.elements[part.index] = el;
      this.bubble.appendChild(el);
    }
    this.parts[part.index].text += part.text;
    el.textContent = this.parts[part.index].text;
  }
  // plain content without parts (a reply from the stronger model escalation sent the question to)
  appendText(text) {
    const last = this.parts.length - 1;
    const index = last >= 0 && this.parts[last].type === "text" ? last : last + 1;
    this.apply({ index, type: "text", text });
  }
  done() {
    this.bubble.classList.remove("cursor");
    // the document passages lookup read (`serve --index`): their first line is "file, lines a-b:"
    const sources = [];
    for (const p of this.parts) {
      const m = p && p.type === "tool_output" && /^([^\n]+, lines? \d+(?:-\d+)?):\n/.exec(p.text);
      if (m && !sources.includes(m[1])) sources.push(m[1]);
    }
    if (sources.length) {
      const el = document.createElement("div");
      el.className = "sources";
      el.textContent = "Sources: " + sources.join("; ");
      this.bubble.appendChild(el);
    }
  }
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = { messages, stream: true };
  if (modelName) body.model = modelName;
  const t = parseFloat($("temperature").value);
  if (!Number.isNaN(t)) body.temperature = t;
  const m = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(m)) body.max_tokens = m;
  return body;
}

// Reads an SSE stream; calls onEvent(data) for each event's data ("[DONE]" included).
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data && onEvent(data) === false) return;
    }
  }
}

function setBusy(busy) {
  sendBtn.disabled = busy;
  stopBtn.hidden = !busy;
}

async function send(text) {
  const myChat = chatId;
  history.push({ role: "user", content: text });
  addMessage("user").textContent = text;
  const bubble = addMessage("assistant");
  const reply = new Reply(bubble);
  controller = new AbortController();
  setBusy(true);
  let finish = null, failed = false;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (res.status === 401) askForKey();  // the next Send uses it
    if (!res.ok) {
      let message = res.status + " " + res.statusText;
      try { message = (await res.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    // `serve --escalate-to`: which model answered (this one, or the stronger one it asked)
    const answeredBy = res.headers.get("X-Exocortex-Answered-By");
    let withParts = false;  // exocortex sends every piece of the reply as a part (text, tool call, tool output)
    await readEvents(res, (data) => {
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return true;
      if (choice.delta && choice.delta.part) {
        reply.apply(choice.delta.part);
        withParts = true;
      } else if (!withParts && choice.delta && choice.delta.content) {
        reply.appendText(choice.delta.content);  // a server that sends no parts: its text is the reply
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      scrollDown(false);
      return true;
    });
    if (finish === "length") addNote(bubble, "(cut off: max tokens reached)");
    if (res.headers.get("X-Exocortex-Escalated") === "true") {
      const p = res.headers.get("X-Exocortex-P-Correct");  // absent when the request asked for "always"
      addNote(bubble, "answered by " + answeredBy + (p === null ? " (escalated)" : " (escalated: "
        + (modelName || "this model") + " put its own chance of being right at " + Math.round(parseFloat(p) * 100) + "%)"));
    }
  } catch (e) {
    if (e.name === "AbortError") {
      addNote(bubble, "(stopped)");
    } else {
      failed = reply.parts.length === 0;
      addNote(bubble, "Error: " + e.message, true);
    }
  } finally {
    reply.done();
    controller = null;
    setBusy(false);
    if (myChat !== chatId) {
      // "New chat" was pressed while this reply was streaming: it belongs to the old conversation
    } else if (failed) {
      // nothing was said: take the question back so it can be sent again
      history.pop();
      if (!input.value) input.value = text;
    } else {
      const parts = reply.parts.filter(Boolean);
      history.push({ role: "assistant", content: parts.length ? parts : "" });
    }
    scrollDown(false);
    input.focus();
    loadNotes();
  }
}

// the model's memory of this page's user ("local", as `exocortex chat`): listed when the panel is open, after
// every reply (the model may have saved a note), and changed through /v1/memory
async function memoryRequest(method, path, body) {
  const res = await fetch("/v1/memory" + path, {
    method,
    headers: body ? { "Content-Type": "application/json", ...authHeaders() } : authHeaders(),
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await res.json().catch(() => ({}));  // a 401 shows in the panel: Send asks for the key
  if (!res.ok) throw new Error((data.error && data.error.message) || res.status + " " + res.statusText);
  return data;
}

let notesLoad = 0;  // only the latest listing is shown (an earlier one may answer last)

async function loadNotes() {
  const list = $("notes");
  if (!$("memory").open) return;
  const mine = ++notesLoad;
  let notes;
  try {
    notes = (await memoryRequest("GET", "")).data;
  } catch (e) {
    if (mine === notesLoad) list.replaceChildren(Object.assign(document.createElement("li"), {
      className: "error", textContent: e.message }));
    return;
  }
  if (mine !== notesLoad) return;
  list.replaceChildren(...notes.map((n) => {
    const li = document.createElement("li");
    li.dataset.id = n.id;
    const text = Object.assign(document.createElement("span"), { textContent: n.text });
    text.title = "saved from " + n.source + ", " + new Date(n.updated_at * 1000).toLocaleString();
    const forget = Object.assign(document.createElement("button"), { type: "button", textContent: "Forget" });
    forget.addEventListener("click", async () => {
      forget.disabled = true;
      try { await memoryRequest("DELETE", "/" + n.id); } catch (e) { alert(e.message); }
      loadNotes();
    });
    li.append(text, forget);
    return li;
  }));
  if (!notes.length) list.replaceChildren(Object.assign(document.createElement("li"), {
    className: "empty-notes", textContent: "No notes yet." }));
}

function stop() {
  if (controller) controller.abort();
}

function newChat() {
  stop();
  chatId += 1;
  history = [];
  for (const el of [...log.querySelectorAll(".msg")]) el.remove();
  $("empty").hidden = false;
  input.focus();
}

function autosize() {
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight, 192) + "px";
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  autosize();
  send(text);
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
input.addEventListener("input", autosize);
document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") stop(); });
stopBtn.addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);
$("memory").addEventListener("toggle", loadNotes);
$("note-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("note-text").value.trim();
  if (!text) return;
  try {
    await memoryRequest("POST", "", { text });
    $("note-text").value = "";
  } catch (e) { alert(e.message); }
  loadNotes();
});

loadModel();
