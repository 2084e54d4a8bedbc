// The emoscope dashboard: a chat whose reply tokens are tinted by an emotion's z-score, a live
// chart of the monitored emotions, the emotion map with the conversation's trail, alerts,
// steering for the next reply, and scoring of an uploaded transcript.
//
// Every piece of model or user text reaches the page through textContent or text nodes only.

import { ApiError, apiKey, getJSON, postJSON, postStream, setApiKey } from "./api.js";
import { EmotionChart, score } from "./chart.js";
import { EmotionMap } from "./map.js";
import { Picker, normalise } from "./picker.js";

const DEFAULT_MONITORED = ["desperate", "calm", "happy", "afraid", "angry"];
const PALETTE = [
  "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
  "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f", "#393b79", "#637939",
];
const TINT_FULL = 3; // |z| at which a token's tint is strongest
const MAX_ALERTS = 100; // the banner keeps the newest
const ROLES = new Set(["user", "assistant", "system"]);

const $ = (id) => document.getElementById(id);
const chat = $("chat");

const state = {
  model: null,
  emotions: [], // the bank's emotion names
  monitored: [],
  tint: null,
  history: [], // the messages the next request carries, after the system prompt
  tokens: [], // every scored token shown, in order: the chart's x axis
  busy: null, // the AbortController of the reply being generated
  conversation: null,
  cursor: null,
  alerts: 0, // alerts seen in this conversation
};

const chart = new EmotionChart($("chart"), (n) => highlight(n));
const map = new EmotionMap($("map"), $("map-hint"));
const unmonitored = () => state.emotions.filter((n) => !state.monitored.includes(n));
new Picker($("monitor-picker"), unmonitored, (name) => setMonitored([...state.monitored, name]));
const steerPicker = new Picker($("steer-picker"), () => state.emotions, () => updateSummary(), {
  keep: true,
});

// ---------------------------------------------------------------- small helpers

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

function signed(z, digits = 2) {
  if (z == null || !Number.isFinite(z)) return "n/a";
  return `${z >= 0 ? "+" : "−"}${Math.abs(z).toFixed(digits)}`;
}

function colour(name) {
  const i = state.monitored.indexOf(name);
  return PALETTE[(i < 0 ? 0 : i) % PALETTE.length];
}

function scrollChat() {
  const near = chat.scrollHeight - chat.scrollTop - chat.clientHeight < 120;
  if (near) chat.scrollTop = chat.scrollHeight;
}

function showError(error) {
  $("error-text").textContent = error instanceof Error ? error.message : String(error);
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function setStatus() {
  const parts = [];
  if (state.model) parts.push(state.model);
  if (state.emotions.length) parts.push(`${state.emotions.length} emotions`);
  if (state.conversation) {
    const id = String(state.conversation);
    parts.push(`conversation ${id.length > 12 ? `${id.slice(0, 8)}…` : id}`);
  }
  parts.push(`${state.tokens.length} tokens`);
  if (state.busy) parts.push("generating…");
  $("status").textContent = parts.join(" · ");
  $("status").title = state.conversation ? `conversation ${state.conversation}` : "";
}

// ---------------------------------------------------------------- monitored emotions and tint

function setMonitored(names) {
  const known = names.filter((n, i) => state.emotions.includes(n) && names.indexOf(n) === i);
  state.monitored = known;
  const chips = known.map((name) => {
    const chip = el("span", "chip");
    chip.style.setProperty("--c", colour(name));
    chip.append(el("span", "swatch"), el("span", "name", name));
    const remove = el("button", "remove", "×");
    remove.type = "button";
    remove.title = `stop monitoring ${name}`;
    remove.setAttribute("aria-label", `remove ${name}`);
    remove.addEventListener("click", () => setMonitored(state.monitored.filter((n) => n !== name)));
    chip.append(remove);
    return chip;
  });
  $("monitored").replaceChildren(...chips);

  const tint = $("tint");
  const options = known.map((name) => {
    const option = el("option", null, name);
    option.value = name;
    return option;
  });
  tint.replaceChildren(...options);
  if (!known.includes(state.tint)) state.tint = known[0] || null;
  if (state.tint) tint.value = state.tint;

  chart.setEmotions(known, known.map(colour));
  chart.setTokens(state.tokens);
  map.setMonitored(known);
  retint();
}

function tintOf(token) {
  const z = state.tint ? score(token, state.tint) : null;
  if (z == null) return null;
  const strength = Math.min(1, Math.abs(z) / TINT_FULL) * 0.85;
  const rgb = z >= 0 ? "220, 38, 38" : "37, 99, 235";
  return { z, background: `rgba(${rgb}, ${strength.toFixed(3)})` };
}

function paint(token) {
  const span = token.span;
  const t = tintOf(token);
  span.style.backgroundColor = t ? t.background : "";
  if (t) span.dataset.z = t.z.toFixed(3);
  else delete span.dataset.z;
}

function retint() {
  for (const token of state.tokens) paint(token);
}

// ---------------------------------------------------------------- chat rendering

function message(role, label) {
  const box = el("article", `msg ${ROLES.has(role) ? role : "other"}`);
  box.dataset.role = String(role ?? "");
  const head = el("header");
  head.append(el("span", "who", label || String(role || "text")));
  const body = el("div", "text");
  box.append(head, body);
  chat.append(box);
  scrollChat();
  return { box, head, body };
}

function notice(text) {
  chat.append(el("p", "notice", text));
  scrollChat();
}

/** Append scored tokens to a message body, the chart and the map. */
function addTokens(body, raw) {
  const added = [];
  const fragment = document.createDocumentFragment();
  for (const item of raw) {
    const token = {
      n: state.tokens.length,
      index: item.index,
      role: item.role,
      text: String(item.text ?? ""),
      scores: item.scores && typeof item.scores === "object" ? item.scores : {},
      top: Array.isArray(item.top) ? item.top : [],
    };
    token.span = el("span", "tok", token.text);
    token.span.dataset.n = String(token.n);
    paint(token);
    fragment.append(token.span);
    state.tokens.push(token);
    added.push(token);
  }
  body.append(fragment);
  chart.setTokens(state.tokens);
  map.advance(added);
  setStatus();
  scrollChat();
  return added;
}

/** The per-message readout: mean z of each monitored emotion, and the strongest moment. */
function readout(box, tokens, extra = []) {
  const foot = el("footer", "readout");
  const means = {};
  for (const name of state.monitored) {
    const values = tokens.map((t) => score(t, name)).filter((z) => z != null);
    if (values.length) means[name] = values.reduce((a, b) => a + b, 0) / values.length;
  }
  foot.dataset.means = JSON.stringify(means);
  const names = Object.keys(means);
  if (names.length) {
    foot.append(el("span", "label", "mean z"));
    for (const name of names) {
      const item = el("span", "mean");
      item.style.setProperty("--c", colour(name));
      item.append(el("span", "swatch"), document.createTextNode(`${name} ${signed(means[name])}`));
      foot.append(item);
    }
  }
  let peak = null;
  for (const t of tokens) {
    for (const [name, z] of t.top) {
      if (Number.isFinite(z) && (!peak || z > peak.z)) peak = { name, z, text: t.text };
    }
  }
  if (peak) foot.append(el("span", "peak", `peak ${peak.name} ${signed(peak.z)} at “${peak.text}”`));
  for (const text of extra) foot.append(el("span", "peak", text));
  if (foot.childElementCount) box.append(foot);
  return foot;
}

// ---------------------------------------------------------------- tooltip and cursor

const tip = $("tip");

function showTip(token, event) {
  const rows = [el("div", "tip-head")];
  rows[0].append(el("span", "tip-text", JSON.stringify(token.text)), el("span", "tip-index", ` token ${token.n}`));
  if (state.tint) {
    rows.push(el("div", "tip-tint", `${state.tint} ${signed(score(token, state.tint))}σ`));
  }
  if (token.top.length) {
    const list = el("ol", "tip-top");
    for (const [name, z] of token.top) list.append(el("li", null, `${name} ${signed(z)}`));
    rows.push(el("div", "tip-label", "top emotions"), list);
  }
  const others = state.monitored.filter((n) => n !== state.tint && score(token, n) != null);
  if (others.length) {
    rows.push(el("div", "tip-label", "monitored"));
    rows.push(el("div", "tip-scores", others.map((n) => `${n} ${signed(score(token, n))}`).join(" · ")));
  }
  tip.replaceChildren(...rows);
  tip.hidden = false;
  moveTip(event);
}

function moveTip(event) {
  const gap = 14;
  const { innerWidth, innerHeight } = window;
  const box = tip.getBoundingClientRect();
  let x = event.clientX + gap;
  let y = event.clientY + gap;
  if (x + box.width > innerWidth - 4) x = event.clientX - box.width - gap;
  if (y + box.height > innerHeight - 4) y = event.clientY - box.height - gap;
  tip.style.left = `${Math.max(4, x)}px`;
  tip.style.top = `${Math.max(4, y)}px`;
}

function tokenAt(target) {
  const span = target.closest ? target.closest(".tok") : null;
  return span ? state.tokens[Number(span.dataset.n)] : null;
}

chat.addEventListener("mouseover", (event) => {
  const token = tokenAt(event.target);
  if (!token) return;
  showTip(token, event);
  chart.point(token.n);
});
chat.addEventListener("mousemove", (event) => {
  if (!tip.hidden) moveTip(event);
});
chat.addEventListener("mouseout", (event) => {
  if (tokenAt(event.target)) tip.hidden = true;
});

function highlight(n) {
  if (state.cursor != null && state.tokens[state.cursor]) {
    state.tokens[state.cursor].span.classList.remove("cursor");
  }
  state.cursor = n != null && state.tokens[n] ? n : null;
  if (state.cursor != null) state.tokens[state.cursor].span.classList.add("cursor");
}

// ---------------------------------------------------------------- alerts

function showAlert(alert, tokens) {
  const list = $("alert-list");
  const item = el("li", "alert");
  const value = typeof alert.value === "number" ? `${signed(alert.value)}σ` : "";
  const step = alert.token_index ?? alert.step; // the reply token that completed the run
  const where = step != null ? ` at token ${step}` : "";
  item.append(el("strong", null, String(alert.rule ?? "alert")));
  item.append(document.createTextNode(` — ${alert.emotion ?? ""} ${value}${where}`));
  const hit = step == null ? null : tokens.find((t) => t.index === step);
  if (hit) {
    hit.span.classList.add("alerted");
    item.append(document.createTextNode(` (“${hit.text}”)`));
  }
  list.prepend(item);
  while (list.childElementCount > MAX_ALERTS) list.lastElementChild.remove();
  state.alerts += 1;
  $("alerts-title").textContent = `Alerts (${state.alerts})`;
  $("alerts").hidden = false;
}

function clearAlerts() {
  state.alerts = 0;
  $("alert-list").replaceChildren();
  $("alerts").hidden = true;
}

$("alerts-clear").addEventListener("click", clearAlerts);
$("error-close").addEventListener("click", clearError);

function alertRules() {
  return $("rules")
    .value.split("\n")
    .map((line) => line.trim())
    .filter(Boolean);
}

/** The emotions a request reports: the monitored ones and those the alert rules name. */
function requested(rules) {
  const names = [...state.monitored];
  for (const rule of rules) {
    const match = /^\s*(?:gap\s*:\s*)?([a-z][a-z _-]*?)\s*[<>]/i.exec(rule);
    const name = match ? normalise(match[1]) : null;
    if (name && state.emotions.includes(name) && !names.includes(name)) names.push(name);
  }
  return names;
}

// ---------------------------------------------------------------- steering

function layerBand() {
  const from = $("layer-from").value.trim();
  const to = $("layer-to").value.trim();
  if (!from && !to) return null;
  const a = Number(from || to);
  const b = Number(to || from);
  if (!Number.isInteger(a) || !Number.isInteger(b) || a < 0 || b < a) {
    throw new ApiError("The layer band needs whole layer numbers, the first no larger than the last.");
  }
  return Array.from({ length: b - a + 1 }, (_, i) => a + i);
}

function steering() {
  const strength = Number($("strength").value);
  if (!strength) return null;
  const name = steerPicker.value;
  if (!name) throw new ApiError("Pick an emotion to steer toward, or set the strength to 0.");
  if (!state.emotions.includes(name)) throw new ApiError(`'${name}' is not an emotion of this bank.`);
  return { emotions: { [name]: strength }, layers: layerBand(), positions: $("positions").value };
}

function describeSteering(s) {
  if (!s) return "unsteered";
  const [[name, strength]] = Object.entries(s.emotions);
  const layers = s.layers
    ? `layer${s.layers.length > 1 ? "s" : ""} ${s.layers[0]}${s.layers.length > 1 ? `–${s.layers[s.layers.length - 1]}` : ""}`
    : "the bank's steering layer";
  return `steered ${name} ${signed(strength)} · ${layers} · ${s.positions} positions`;
}

function updateSummary() {
  const strength = Number($("strength").value);
  $("strength-value").textContent = signed(strength).replace("−", "-");
  let text;
  try {
    text = describeSteering(steering());
  } catch (error) {
    text = error.message;
  }
  $("steer-summary").textContent = `next reply: ${text}`;
}

for (const id of ["strength", "layer-from", "layer-to", "positions"]) {
  $(id).addEventListener("input", updateSummary);
}
$("steer-picker").querySelector("input").addEventListener("input", updateSummary);
$("steer-reset").addEventListener("click", () => {
  $("strength").value = "0";
  $("layer-from").value = "";
  $("layer-to").value = "";
  $("positions").value = "all";
  steerPicker.value = "";
  updateSummary();
});

// ---------------------------------------------------------------- sending a message

function setBusy(controller) {
  state.busy = controller;
  $("send").disabled = Boolean(controller);
  $("stop").hidden = !controller;
  setStatus();
}

function numberField(id) {
  const text = $(id).value.trim();
  if (!text) return null;
  const value = Number(text);
  if (!Number.isFinite(value)) throw new ApiError(`${$(id).closest("label").firstChild.textContent.trim()} must be a number.`);
  return value;
}

function systemMessages() {
  const text = $("system").value.trim();
  return text ? [{ role: "system", content: text }] : [];
}

async function send(text) {
  if (state.busy || !text.trim()) return;
  clearError();
  let steer;
  let maxTokens;
  let temperature;
  let topK;
  let seed;
  try {
    steer = steering();
    maxTokens = numberField("max-tokens");
    temperature = numberField("temperature");
    topK = numberField("top-k");
    seed = numberField("seed");
  } catch (error) {
    showError(error);
    return;
  }
  const rules = alertRules();
  const user = { role: "user", content: text };
  const asked = message("user");
  asked.body.textContent = text;
  const reply = message("assistant");
  reply.head.append(el("span", steer ? "badge steered" : "badge", describeSteering(steer)));
  reply.box.classList.add("streaming");

  const extension = { emotions: requested(rules), top_k: topK ?? 5 };
  if ($("ignore-eos").checked) extension.ignore_eos = true;
  if (steer) extension.steering = steer;
  if (rules.length) extension.alerts = rules;
  const body = {
    model: state.model || "emoscope",
    messages: [...systemMessages(), ...state.history, user],
    stream: true,
    emoscope: extension,
  };
  if (maxTokens != null) body.max_tokens = maxTokens;
  if (temperature != null) body.temperature = temperature;
  if (seed != null) body.seed = seed;

  const controller = new AbortController();
  setBusy(controller);
  $("message").value = "";
  const tokens = [];
  const seen = new Set();
  let content = "";
  let finish = null;
  let outcome = "done";
  try {
    await postStream(
      "/v1/chat/completions",
      body,
      (chunk) => {
        const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : null;
        // the text the reply shows; null in chunks without content (the last one, usage)
        const delta = choice && choice.delta && typeof choice.delta.content === "string" ? choice.delta.content : null;
        const extra = chunk.emoscope || {};
        if (extra.conversation_id && extra.conversation_id !== state.conversation) {
          state.conversation = extra.conversation_id;
          setStatus();
        }
        if (Array.isArray(extra.tokens) && extra.tokens.length) {
          const added = addTokens(reply.body, extra.tokens);
          tokens.push(...added);
          content += delta ?? added.map((t) => t.text).join("");
        } else if (delta) {
          reply.body.append(document.createTextNode(delta));
          content += delta;
          scrollChat();
        }
        for (const alert of Array.isArray(extra.alerts) ? extra.alerts : []) {
          const key = `${alert.rule}|${alert.emotion}|${alert.token_index ?? alert.step}`;
          if (seen.has(key)) continue;
          seen.add(key);
          showAlert(alert, tokens);
        }
        if (choice && choice.finish_reason) finish = choice.finish_reason;
      },
      controller.signal,
    );
  } catch (error) {
    if (error.name === "AbortError") {
      outcome = "stopped";
    } else {
      outcome = "failed";
      showError(error);
    }
  }
  reply.box.classList.remove("streaming");
  if (outcome === "failed") {
    asked.box.classList.add("failed");
    reply.box.classList.add("failed");
    if (!reply.body.childNodes.length) reply.body.append(el("em", null, "no reply"));
  } else {
    state.history.push(user, { role: "assistant", content });
  }
  const notes = [];
  if (outcome === "stopped") notes.push("stopped");
  else if (finish === "length") notes.push("cut at max tokens");
  readout(reply.box, tokens, notes);
  reply.box.dataset.done = outcome;
  setBusy(null);
  scrollChat();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send($("message").value);
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send($("message").value);
  }
});
$("stop").addEventListener("click", () => state.busy && state.busy.abort());

// ---------------------------------------------------------------- new conversation, upload

function reset() {
  if (state.busy) state.busy.abort();
  state.history = [];
  state.tokens = [];
  state.conversation = null;
  state.cursor = null;
  chat.replaceChildren();
  delete chat.dataset.transcript;
  chart.setTokens(state.tokens);
  map.advance(null);
  clearAlerts();
  clearError();
  setStatus();
}

$("new-chat").addEventListener("click", reset);

function readTranscript(text) {
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    throw new ApiError(`The file is not JSON: ${error.message}`);
  }
  const messages = Array.isArray(parsed) ? parsed : parsed && parsed.messages;
  const valid =
    Array.isArray(messages) &&
    messages.length > 0 &&
    messages.every((m) => m && typeof m.role === "string" && typeof m.content === "string");
  if (!valid) throw new ApiError("A transcript is a JSON list of {\"role\", \"content\"} messages.");
  return messages.map((m) => ({ role: m.role, content: m.content }));
}

async function upload(file) {
  if (state.busy) return;
  clearError();
  let messages;
  try {
    messages = readTranscript(await file.text());
  } catch (error) {
    showError(error);
    return;
  }
  const controller = new AbortController();
  setBusy(controller);
  let result;
  try {
    let topK;
    try {
      topK = numberField("top-k");
    } catch {
      topK = null;
    }
    const request = { messages, emotions: requested([]), top_k: topK ?? 5 };
    result = await postJSON("/v1/score", request, controller.signal);
  } catch (error) {
    setBusy(null);
    if (error.name !== "AbortError") showError(error);
    return;
  }
  setBusy(null);
  reset();
  const tokens = Array.isArray(result.tokens) ? result.tokens : [];
  // consecutive tokens of one role make one message
  let group = null;
  let groupTokens = [];
  const close = () => {
    // chat-template tokens (role "format") are shown, but get no readout of their own
    if (group && ROLES.has(group.box.dataset.role)) readout(group.box, groupTokens);
  };
  for (const token of tokens) {
    const role = token.role ?? (group ? group.box.dataset.role : "text");
    if (!group || group.box.dataset.role !== String(role)) {
      close();
      group = message(role);
      group.box.classList.add("scored");
      groupTokens = [];
    }
    groupTokens.push(...addTokens(group.body, [token]));
  }
  close();
  // the transcript becomes the conversation; its system turns become the system prompt
  const system = messages.filter((m) => m.role === "system" || m.role === "developer");
  if (system.length) $("system").value = system.map((m) => m.content).join("\n\n");
  state.history = messages.filter((m) => !system.includes(m));
  notice(`Scored ${file.name}: ${messages.length} messages, ${tokens.length} tokens. Sending a message continues this conversation.`);
  chat.dataset.transcript = file.name;
}

$("upload").addEventListener("change", (event) => {
  const [file] = event.target.files;
  event.target.value = "";
  if (file) upload(file);
});

// ---------------------------------------------------------------- start

$("tint").addEventListener("change", (event) => {
  state.tint = event.target.value;
  retint();
});

$("key-form").addEventListener("submit", (event) => event.preventDefault());
const keyField = $("api-key");
keyField.value = apiKey();
keyField.addEventListener("change", () => {
  setApiKey(keyField.value.trim());
  if (!state.emotions.length) load();
});

async function load() {
  clearError();
  try {
    const [models, emotions] = await Promise.all([getJSON("/v1/models"), getJSON("/v1/emotions")]);
    const first = models && Array.isArray(models.data) ? models.data[0] : null;
    state.model = first ? first.id : null;
    const rows = emotions && Array.isArray(emotions.data) ? emotions.data : [];
    state.emotions = rows.map((r) => r.name);
    map.setEmotions(rows);
    const preset = DEFAULT_MONITORED.filter((n) => state.emotions.includes(n));
    setMonitored(preset.length ? preset : state.emotions.slice(0, 5));
    if (!steerPicker.value && state.emotions.includes("calm")) steerPicker.value = "calm";
    updateSummary();
    setStatus();
    document.body.dataset.ready = "true";
  } catch (error) {
    $("status").textContent = "not connected";
    showError(error);
  }
}

updateSummary();
load();
