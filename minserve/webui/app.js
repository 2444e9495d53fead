// The chat page: talks only to this server's OpenAI routes (relative URLs, so a --root-path
// works). Everything from the model or the user is inserted as text (textContent, text
// nodes): nothing here parses HTML or evaluates code.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "minserve.apiKey";
let apiKey = localStorage.getItem(KEY_STORAGE) || "";
let keyPrompt = null;     // the open key dialog's promise, shared by concurrent 401s
let controller = null;    // the AbortController of the answer being streamed
let conversation = [];    // {role, text, images, reasoning, tool_calls, error, stats}
let attachments = [];     // images chosen for the next message: {name, url}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(text) {
  $("status").textContent = text;
}

// ---- API calls: every one carries the key; a 401 asks for it once and retries
function askKey(reason) {
  keyPrompt ||= new Promise((resolve, reject) => {
    const dialog = $("key-dialog");
    $("key-reason").textContent = reason;
    $("key").value = "";
    dialog.returnValue = "";
    dialog.onclose = () => {
      keyPrompt = null;
      dialog.returnValue === "saved" ? resolve() : reject(new Error("this server needs an API key"));
    };
    dialog.showModal();
  });
  return keyPrompt;
}

function saveKey() {
  apiKey = $("key").value.trim();
  localStorage.setItem(KEY_STORAGE, apiKey);
  $("key-dialog").close("saved");
}

async function api(path, options = {}) {
  for (;;) {
    const headers = {"Content-Type": "application/json"};
    if (apiKey) headers.Authorization = "Bearer " + apiKey;
    const res = await fetch(path, {...options, headers});
    if (res.status !== 401) return res;
    await askKey(apiKey ? "The server refused this API key; enter another one."
                        : "This server needs an API key (--api-key).");
  }
}

async function errorText(res) {
  try {
    const body = await res.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch {
    return `${res.status} ${res.statusText}`;
  }
}

// Server-sent events of a streamed response, parsed; ends at [DONE].
async function* events(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    const frames = buffer.split("\n\n");
    buffer = frames.pop();
    for (const frame of frames) {
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        if (line === "data: [DONE]") return;
        yield JSON.parse(line.slice(6));
      }
    }
  }
}

async function loadModels() {
  let res;
  try {
    res = await api("v1/models");
  } catch (e) {
    return setStatus(e.message);
  }
  if (res.status === 503) {
    setStatus("the model is loading...");
    return setTimeout(loadModels, 2000);
  }
  if (!res.ok) return setStatus(await errorText(res));
  const options = (await res.json()).data.map((card) => {
    const state = typeof card.status === "string" ? ` (${card.status})` : "";
    const option = el("option", null, card.id + state);
    option.value = card.id;
    return option;
  });
  $("model").replaceChildren(...options);
  setStatus("");
}

// ---- rendering: text nodes only; ``` fences become <pre><code> holding text
function renderText(node, text) {
  node.replaceChildren();
  text.split("```").forEach((part, i) => {
    if (i % 2 === 0) {  // prose; the line break after a closing fence is the block's own
      const prose = i ? part.replace(/^\n/, "") : part;
      if (prose) node.append(document.createTextNode(prose));
      return;
    }
    const newline = part.indexOf("\n");  // the fence's first line names the language
    const code = el("code", null, (newline >= 0 ? part.slice(newline + 1) : part)
      .replace(/\n$/, ""));
    const pre = el("pre");
    pre.append(code);
    node.append(pre);
  });
}

function fileView(file, onRemove) {
  const node = el("div", "file");
  const img = el("img");
  img.src = file.url;
  img.alt = "";
  node.append(img, el("span", null, file.name));
  if (onRemove) {
    const remove = el("button", null, "x");
    remove.type = "button";
    remove.title = "remove";
    remove.onclick = onRemove;
    node.append(remove);
  }
  return node;
}

function statsText(stats) {
  const parts = [`${stats.num_tokens} ${stats.num_tokens === 1 ? "token" : "tokens"}`];
  if (stats.ttft_s !== null) parts.push(`TTFT ${stats.ttft_s.toFixed(2)} s`);
  if (stats.tokens_per_s !== null) parts.push(`${stats.tokens_per_s.toFixed(1)} tok/s`);
  if (stats.finish_reason) parts.push(stats.finish_reason);
  return parts.join(" · ");
}

function messageView(msg) {
  const root = el("div", "msg " + msg.role);
  const reasoning = el("details", "reasoning");
  const thought = el("div", "text");
  reasoning.append(el("summary", null, "Reasoning"), thought);
  const body = el("div", "text content");
  const calls = el("div", "calls");
  const files = el("div", "files");
  const error = el("div", "error");
  const stats = el("div", "stats");
  root.append(el("div", "role", msg.role), reasoning, body, calls, files, error, stats);
  const update = () => {
    reasoning.hidden = !msg.reasoning;
    thought.textContent = msg.reasoning || "";
    renderText(body, msg.text);
    calls.replaceChildren(...(msg.tool_calls || []).map((c) =>
      el("pre", "call", `${c.function.name}(${c.function.arguments})`)));
    files.replaceChildren(...(msg.images || []).map((f) => fileView(f)));
    error.textContent = msg.error || "";
    stats.textContent = msg.stats ? statsText(msg.stats) : "";
  };
  update();
  $("log").append(root);
  return update;
}

function renderLog() {
  $("log").replaceChildren();
  conversation.forEach(messageView);
}

function renderAttachments() {
  $("attachments").replaceChildren(...attachments.map((file, i) => fileView(file, () => {
    attachments.splice(i, 1);
    renderAttachments();
  })));
}

function setBusy(busy) {
  for (const id of ["send", "regenerate", "edit", "clear"]) $(id).disabled = busy;
  $("stop").disabled = !busy;
}

// ---- the request: the conversation as OpenAI messages, plus the settings
function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  for (const m of conversation) {
    if (m.error && !m.text) continue;
    const images = (m.images || []).map((f) => ({type: "image_url", image_url: {url: f.url}}));
    const content = images.length ? [{type: "text", text: m.text}, ...images] : m.text;
    messages.push({role: m.role, content});
  }
  const body = {model: $("model").value, messages, stream: true,
                stream_options: {include_usage: true}};
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  if ($("json-mode").checked) body.response_format = {type: "json_object"};
  return body;
}

function mergeToolCall(calls, delta) {
  const call = calls[delta.index] ||= {id: delta.id, type: "function",
                                       function: {name: "", arguments: ""}};
  call.function.name += (delta.function && delta.function.name) || "";
  call.function.arguments += (delta.function && delta.function.arguments) || "";
}

async function complete() {
  const body = requestBody();
  const msg = {role: "assistant", model: body.model, text: "", reasoning: "", tool_calls: [],
               error: "", stats: null};
  conversation.push(msg);
  const update = messageView(msg);
  controller = new AbortController();
  setBusy(true);
  const start = performance.now();
  let first = null, numChunks = 0, usage = null, finish = "";
  try {
    const res = await api("v1/chat/completions", {method: "POST", body: JSON.stringify(body),
                                                   signal: controller.signal});
    if (!res.ok) throw new Error(await errorText(res));
    for await (const event of events(res)) {
      if (event.error) throw new Error(event.error.message);
      usage = event.usage || usage;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      const thought = delta.reasoning_content ?? delta.reasoning ?? "";
      if (delta.content || thought || delta.tool_calls) {
        first ??= performance.now();
        numChunks += 1;
      }
      msg.text += delta.content || "";
      msg.reasoning += thought;
      for (const call of delta.tool_calls || []) mergeToolCall(msg.tool_calls, call);
      finish = choice.finish_reason || finish;
      update();
      $("log").scrollTop = $("log").scrollHeight;
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else msg.error = e.message;
  } finally {
    controller = null;
    setBusy(false);
  }
  const end = performance.now();
  // Without a usage chunk (a stopped stream) each content chunk counts as one token.
  const numTokens = usage ? usage.completion_tokens : numChunks;
  msg.stats = {num_tokens: numTokens, finish_reason: finish,
               ttft_s: first === null ? null : (first - start) / 1000,
               tokens_per_s: first !== null && numTokens > 1 && end > first
                 ? (numTokens - 1) / ((end - first) / 1000) : null};
  update();
}

// ---- actions
function send() {
  const text = $("prompt").value.trim();
  if (controller || (!text && !attachments.length)) return;
  const msg = {role: "user", text, images: attachments};
  conversation.push(msg);
  messageView(msg);
  $("prompt").value = "";
  attachments = [];
  renderAttachments();
  complete();
}

function regenerate() {
  if (conversation.length && conversation.at(-1).role === "assistant") conversation.pop();
  if (!conversation.length) return;
  renderLog();
  complete();
}

function editLast() {
  const i = conversation.findLastIndex((m) => m.role === "user");
  if (i < 0) return;
  $("prompt").value = conversation[i].text;
  attachments = conversation[i].images || [];
  conversation.splice(i);
  renderLog();
  renderAttachments();
  $("prompt").focus();
}

function exportChat() {
  const data = {model: $("model").value, system: $("system").value, messages: conversation};
  const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)],
                                           {type: "application/json"}));
  const link = el("a");
  link.href = url;
  link.download = "minserve-chat.json";
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(event) {
  for (const file of event.target.files) {
    attachments.push({name: file.name, url: await readDataURL(file)});
  }
  event.target.value = "";
  renderAttachments();
}

document.addEventListener("DOMContentLoaded", () => {
  $("send").onclick = send;
  $("stop").onclick = () => controller && controller.abort();
  $("regenerate").onclick = regenerate;
  $("edit").onclick = editLast;
  $("clear").onclick = () => {
    conversation = [];
    renderLog();
  };
  $("export").onclick = exportChat;
  $("attach").onchange = attach;
  $("key-save").onclick = saveKey;
  $("key").onkeydown = (e) => e.key === "Enter" && saveKey();
  $("prompt").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  };
  loadModels();
});
