// tunelab serve's comparison page: one conversation per selected model, each streamed from
// /v1/chat/completions. Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], histories: {}, auth: false, busy: 0 };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModels() {
  const health = await (await fetch("/health")).json();
  state.auth = health.auth;
  $("key_label").hidden = !health.auth;
  $("report").hidden = !health.report;
  const reply = await fetch("/v1/models", { headers: headers() });
  if (!reply.ok) {
    $("status").textContent = reply.status === 401 ? "enter the API key, then press Reset" : "cannot list models";
    return;
  }
  state.models = (await reply.json()).data;
  const box = $("models");
  box.querySelectorAll("label").forEach((l) => l.remove());
  state.models.forEach((m, i) => {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = m.id;
    input.checked = i < 2;
    input.addEventListener("change", layout);
    label.append(input, " " + m.id);
    box.appendChild(label);
  });
  $("status").textContent = `${state.models.length} models served`;
  layout();
}

function selected() {
  return [...$("models").querySelectorAll("input:checked")].map((i) => i.value);
}

function column(name) {
  let col = document.querySelector(`.column[data-model="${CSS.escape(name)}"]`);
  if (col) return col;
  const model = state.models.find((m) => m.id === name) || {};
  col = document.createElement("section");
  col.className = "column";
  col.dataset.model = name;
  col.dataset.state = "idle";
  col.innerHTML = `<h2><span class="name"></span><span class="muted"></span></h2>` +
    `<div class="messages"></div><div class="stats muted"></div>`;
  col.querySelector(".name").textContent = name;
  col.querySelector("h2 .muted").textContent = model.method || "";
  return col;
}

function layout() {
  const main = $("columns");
  const names = selected();
  [...main.children].forEach((c) => { if (!names.includes(c.dataset.model)) c.remove(); });
  names.forEach((n) => main.appendChild(column(n)));
}

function addMessage(col, role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  col.querySelector(".messages").appendChild(div);
  return div;
}

async function ask(name, text) {
  const col = column(name);
  const history = (state.histories[name] = state.histories[name] || []);
  const messages = [...history, { role: "user", content: text }];
  const system = $("system").value.trim();
  if (system && !messages.some((m) => m.role === "system")) messages.unshift({ role: "system", content: system });
  addMessage(col, "user", text);
  const out = addMessage(col, "assistant", "");
  col.dataset.state = "streaming";
  const started = performance.now();
  let usage = null, answer = "", finish = null;
  try {
    const reply = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model: name, messages, stream: true, stream_options: { include_usage: true },
                             max_tokens: Number($("max_tokens").value), temperature: Number($("temperature").value) }),
    });
    if (!reply.ok) throw new Error((await reply.json()).error.message);
    const reader = reply.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        if (event.usage) usage = event.usage;
        for (const choice of event.choices || []) {
          if (choice.delta && choice.delta.content) { answer += choice.delta.content; out.textContent = answer; }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? usage.completion_tokens : 0;
    col.querySelector(".stats").textContent =
      `${tokens} tokens in ${seconds.toFixed(2)} s (${(tokens / seconds).toFixed(1)} tokens/s), ${finish}`;
    col.dataset.state = "done";
  } catch (err) {
    out.className = "msg error";
    out.textContent = String(err.message || err);
    col.dataset.state = "error";
  }
}

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  const names = selected();
  if (!text || !names.length) return;
  $("message").value = "";
  await Promise.all(names.map((n) => ask(n, text)));
});

$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});

$("reset").addEventListener("click", () => {
  state.histories = {};
  $("columns").innerHTML = "";
  loadModels();
});

$("report").addEventListener("click", async (event) => {
  if (!state.auth) return; // a plain link to /report (target _blank)
  event.preventDefault(); // with a key: fetched with it, opened from memory
  const reply = await fetch("/report", { headers: headers() });
  if (!reply.ok) { $("status").textContent = "report: " + (await reply.json()).error.message; return; }
  window.open(URL.createObjectURL(await reply.blob()), "_blank");
});

loadModels();
