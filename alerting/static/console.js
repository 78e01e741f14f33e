"use strict";
/* ---------------------------------------------------------------- small helpers */
const $ = (selector) => document.querySelector(selector);
const OPEN = ["new", "acknowledged", "dispatched", "on_site"];
const RANK = { critical: 0, high: 1, normal: 2, low: 3 };
const EVIDENCE_HOURS = 2;
const MEASURE = { ch4_lel: "methane", flow_m3h: "gas flow" };  // evidence field -> its name
const DEPARTMENT_FOR = {  // a suggestion for the dispatch dialog; the dispatcher may change it
  emergency_repair: "emergency repair", inspection: "emergency repair", engineering: "engineering",
  installation: "new connections", complaint: "customer service", enquiry: "customer service",
  chasing: "customer service",
};

/** An element with attributes (``testid`` -> data-testid, ``on*`` -> listeners) and children. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "testid") node.dataset.testid = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

let clockSkew = 0;  // server time minus this browser's, from the Date header
const now = () => Date.now() + clockSkew;
const pad = (n) => String(n).padStart(2, "0");
const words = (s) => String(s ?? "").replaceAll("_", " ");

function clock(when) {  // an ISO string or milliseconds
  const d = new Date(when);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function stamp(iso) {
  return iso ? `${new Date(iso).toLocaleDateString()} ${clock(iso)}` : "";
}

/** "in 12:05", "in 3h 20m", "04:10 late": the time left to a promise. */
function countdown(iso) {
  const ms = Date.parse(iso) - now();
  const s = Math.floor(Math.abs(ms) / 1000);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  const body = h ? `${h}h ${pad(m)}m` : `${pad(m)}:${pad(s % 60)}`;
  return { text: ms < 0 ? `${body} late` : `in ${body}`, late: ms < 0, soon: ms >= 0 && ms < 600000 };
}

/** A countdown element; the ticker below keeps every one of them current. */
function dueElement(label, iso, testid) {
  const node = el("span", { class: "due", testid, "data-due": iso, "data-label": label });
  tickOne(node);
  return node;
}

function tickOne(node) {
  const left = countdown(node.dataset.due);
  node.textContent = `${node.dataset.label} ${left.text}`.trim();
  node.classList.toggle("late", left.late);
  node.classList.toggle("soon", left.soon);
  node.title = `promised by ${stamp(node.dataset.due)}`;
}

setInterval(() => document.querySelectorAll("[data-due]").forEach(tickOne), 1000);

/** The promise that applies now: being on site, until then; then resolving. */
function promiseOf(t) {
  if (t.on_site_due && ["new", "acknowledged", "dispatched"].includes(t.status)) {
    return { label: "on site", due: t.on_site_due };
  }
  return { label: "resolve", due: t.resolve_due };
}

/* ---------------------------------------------------------------- messages */
function say(text, kind = "info") {
  $("#message-text").textContent = text;
  $("#message").dataset.kind = kind;
  $("#message").hidden = false;
}
/** An API error under what it was about; a session that ended has said so already. */
function fail(about, err) {
  if (err.status === 401 && user === null) return;
  say(`${about}: ${err.message}`, "error");
}
$("#message-close").addEventListener("click", () => { $("#message").hidden = true; });

/* ---------------------------------------------------------------- the API */
class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

function describeDetail(body, status) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {  // a validation error: one message per bad field
    return detail.map((e) => `${(e.loc || []).slice(1).join(".") || "request"}: ${e.msg}`).join("; ");
  }
  return `the hotline answered ${status}`;
}

async function api(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method, credentials: "same-origin",
      headers: body === undefined ? {} : { "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, "the hotline cannot be reached; check the network and try again");
  }
  const date = Date.parse(response.headers.get("Date") || "");
  if (!Number.isNaN(date) && Math.abs(date - Date.now()) > 2000) clockSkew = date - Date.now();
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401 && user) signedOut("Your session has ended: sign in again.");
    throw new ApiError(response.status, describeDetail(data, response.status));
  }
  return data;
}

/* ---------------------------------------------------------------- the alert sound */
let audio = null;
let alerts = 0;

/** Browsers allow sound only after a gesture: the context is made (or resumed) on a click. */
function unlockAudio() {
  try {
    const Context = window.AudioContext || window.webkitAudioContext;
    if (!Context) return;
    audio = audio || new Context();
    if (audio.state === "suspended") audio.resume().catch(() => {});
  } catch (err) {
    console.warn("GasGuard: no alert sound in this browser", err);
  }
}
document.addEventListener("click", unlockAudio, { capture: true });

/** Two short beeps for a critical ticket. Never throws: a console without sound still works. */
function beep() {
  alerts += 1;
  document.body.dataset.alerts = String(alerts);
  try {
    unlockAudio();
    if (!audio || audio.state !== "running") return;
    for (const offset of [0, 0.25]) {
      const tone = audio.createOscillator(), gain = audio.createGain();
      tone.frequency.value = 880;
      gain.gain.value = 0.2;
      tone.connect(gain).connect(audio.destination);
      tone.start(audio.currentTime + offset);
      tone.stop(audio.currentTime + offset + 0.15);
    }
  } catch (err) {
    console.warn("GasGuard: the alert sound failed", err);
  }
}

/* ---------------------------------------------------------------- signing in */
let user = null;

async function signedIn(me) {
  user = me;
  const next = new URLSearchParams(location.search).get("next");
  if (next === "/report") { location.assign(next); return; }
  try { await loadActionRules(); } catch (err) { say(err.message, "error"); }
  $("#whoami").textContent = `${me.display_name} (${words(me.role)})`;
  $("#login").hidden = true;
  $("#console").hidden = false;
  $("#logout").hidden = false;
  connectLive();
  document.dispatchEvent(new CustomEvent("gasguard:signed-in", { detail: me }));  // calls.js
}

function signedOut(why) {
  user = null;
  stopLive();
  forgetTickets();
  $("#console").hidden = true;
  $("#logout").hidden = true;
  $("#whoami").textContent = "";
  $("#login").hidden = false;
  document.dispatchEvent(new CustomEvent("gasguard:signed-out"));
  if (why) say(why, "error");
  $("#login-username").focus();
}

$("#login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  try {
    const granted = await api("POST", "/api/auth/login",
      { username: form.get("username").trim(), password: form.get("password") });
    $("#login-password").value = "";
    $("#message").hidden = true;
    signedIn(granted.user);
  } catch (err) {
    say(err.message, "error");
  }
});

$("#logout").addEventListener("click", async () => {
  try { await api("POST", "/api/auth/logout"); } catch (err) { /* signed out either way */ }
  signedOut();
});

/* ---------------------------------------------------------------- the queue */
const queue = new Map();    // ticket id -> summary, the open tickets shown
const latest = new Map();   // ticket id -> updated_at last applied (also for ones that left)
const rows = new Map();     // ticket id -> <tr>
let loaded = false;         // the first snapshot is in
let loading = null;         // the snapshot being loaded, while events wait in `waiting`
let waiting = [];
let selected = null;        // the ticket in the detail pane
let fresh = null;           // a ticket that just became critical: its row flashes

/** Nothing of one user's session stays on the screen for the next. */
function forgetTickets() {
  for (const row of rows.values()) row.remove();
  queue.clear();
  latest.clear();
  rows.clear();
  waiting = [];
  loaded = false;
  selected = null;
  $("#failed-rows").hidden = true;
  detailSeq += 1;  // a detail still loading is not shown
  $("#detail").replaceChildren(
    el("p", { class: "empty" }, "Select a ticket to see its household, evidence and history."));
}

const inQueue = (t) => OPEN.includes(t.status) && !t.inhibited;
const newer = (t) => !latest.has(t.id) || Date.parse(t.updated_at) >= latest.get(t.id);

function remember(t) {
  latest.set(t.id, Date.parse(t.updated_at));
  if (inQueue(t)) queue.set(t.id, t); else queue.delete(t.id);
  rows.get(t.id)?.remove();
  rows.delete(t.id);  // made again by render, with the new state
}

async function loadQueue() {
  if (loading) return loading;
  loading = (async () => {
    try {
      const snapshot = await api("GET", "/api/tickets");
      if (!user) return;  // signed out meanwhile
      const before = new Set(queue.keys());
      queue.clear();
      for (const row of rows.values()) row.remove();
      rows.clear();
      for (const t of snapshot) remember(t);
      loadFailedRows();
      if (loaded && snapshot.some((t) => t.priority === "critical" && !before.has(t.id))) beep();
      loaded = true;
    } catch (err) {
      fail("The queue could not be loaded", err);
    } finally {
      loading = null;
      const held = waiting;
      waiting = [];
      held.forEach(onTicketEvent);  // what happened while the snapshot was read
      renderQueue();
    }
  })();
  return loading;
}

/* Alarms the hotline could not read fully: each is on a ticket, named here until it is done. */
let failedSoon = null;

async function loadFailedRows() {
  try {
    const failed = (await api("GET", "/api/alarms/failed?hours=24"))
      .filter((r) => r.ticket_id === null || OPEN.includes(r.ticket_status));
    const box = $("#failed-rows");
    box.hidden = failed.length === 0;
    const tickets = [...new Set(failed.map((r) => r.ticket_id).filter((id) => id !== null))];
    box.replaceChildren(
      el("strong", {}, `${failed.length} alarm(s) could not be read fully. `),
      "Check the raw payload on ",
      ...tickets.map((id) => el("button", { type: "button", testid: `failed-ticket-${id}`,
                                          onclick: () => select(id) }, `ticket ${id}`)),
      failed.some((r) => r.ticket_id === null) ? " (and rows with no ticket: see /health)" : "",
    );
  } catch (err) {
    fail("The alarms that could not be read could not be loaded", err);
  }
}

function loadFailedRowsSoon() {
  if (failedSoon === null) failedSoon = setTimeout(() => { failedSoon = null; loadFailedRows(); }, 500);
}

/** One message of the live feed: {event: {id, ticket, kind}, ticket: summary or null}. */
function onTicketEvent(message) {
  if (loading) { waiting.push(message); return; }
  const { event, ticket } = message;
  if (["opened", "alarm_unreadable"].includes(event.kind) || !$("#failed-rows").hidden) {
    loadFailedRowsSoon();  // a new ticket may hold an alarm that could not be read
  }
  const id = Number(event.ticket);
  const was = queue.get(id);
  if (ticket === null) {
    queue.delete(id);
  } else if (newer(ticket)) {
    remember(ticket);
    const critical = inQueue(ticket) && ticket.priority === "critical";
    if (critical && (!was || was.priority !== "critical" || event.kind === "escalated")) {
      beep();
      fresh = id;
    }
  }
  renderQueue();
  if (id === selected) refreshDetailSoon();
}

function renderQueue() {
  const body = $("#queue-body");
  const ordered = [...queue.values()].sort((a, b) =>
    RANK[a.priority] - RANK[b.priority] || Date.parse(a.due) - Date.parse(b.due) || a.id - b.id);
  for (const [id, row] of rows) if (!queue.has(id)) { row.remove(); rows.delete(id); }
  body.querySelector(".empty-row")?.remove();
  for (const t of ordered) {
    if (!rows.has(t.id)) rows.set(t.id, ticketRow(t));
    body.append(rows.get(t.id));  // append moves an existing row into its place
  }
  if (fresh !== null) { rows.get(fresh)?.classList.add("fresh"); fresh = null; }
  if (!ordered.length) {
    body.append(el("tr", { class: "empty-row" },
      el("td", { colspan: 7, class: "empty", testid: "queue-empty" },
        loaded ? "No open tickets." : "Loading the queue…")));
  }
  $("#queue-count").textContent = `(${ordered.length})`;
}

function ticketRow(t) {
  const promise = promiseOf(t);
  const row = el("tr", {
    testid: `ticket-row-${t.id}`, class: t.priority, "data-priority": t.priority,
    "aria-selected": String(t.id === selected),
    onclick: (event) => { if (!event.target.closest("button")) select(t.id); },
  },
    el("td", {},
      el("span", { class: `badge ${t.priority}`, testid: `ticket-priority-${t.id}` }, t.priority),
      t.test_mode && el("span", { class: "badge test", testid: `ticket-test-${t.id}`, title: "test or maintenance mode: never dispatched" }, "TEST"),
      t.escalation_level > 0 && el("span", { class: "badge escalation", testid: `ticket-escalation-${t.id}`, title: `escalated ${t.escalation_level} time(s)` }, `esc ${t.escalation_level}`)),
    el("td", {},
      el("button", { type: "button", class: "ticket-link", testid: `open-${t.id}`, "aria-label": `Show ticket ${t.id}`, onclick: () => select(t.id) }, `#${t.id}`),
      el("div", { class: "small" }, words(t.category))),
    el("td", {},
      t.is_incident
        ? [el("span", { class: "badge incident" }, "incident"), `${t.district}: ${t.households_under} households`]
        : el("span", { testid: `ticket-address-${t.id}` }, t.address || "no household"),
      el("div", { class: "small" }, [t.household_id, t.district].filter(Boolean).join(" · "))),
    el("td", {}, t.summary,
      t.repeats > 0 && !t.is_incident && el("div", { class: "small" }, `repeated ${t.repeats}×`)),
    el("td", {},
      el("span", { testid: `ticket-status-${t.id}` }, words(t.status)),
      el("div", { class: "small", testid: `ticket-owner-${t.id}` }, t.owner),
      t.crew && el("div", { class: "small" }, `${t.department} / ${t.crew}`)),
    el("td", {}, dueElement(promise.label, promise.due, `ticket-due-${t.id}`)),
    el("td", {}, el("div", { class: "actions" }, actionButtons(t))),
  );
  return row;
}

/* ---------------------------------------------------------------- actions */
// `from` (the states an action is allowed in) comes from the server's own table at sign-in
const ACTIONS = [
  { key: "ack", path: "acknowledge", label: "Acknowledge", from: [] },
  { key: "dispatch", path: "dispatch", label: "Dispatch…", from: [], ask: askDispatch },
  { key: "onsite", path: "on-site", label: "On site", from: [] },
  { key: "resolve", path: "resolve", label: "Resolve", from: [] },
  { key: "cancel", path: "cancel", label: "Cancel…", from: [], ask: askCancel, danger: true },
];

async function loadActionRules() {
  const rules = await api("GET", "/api/tickets/actions");
  for (const a of ACTIONS) a.from = rules[a.path.replace("-", "_")]?.starts ?? [];
}

function actionButtons(t) {
  const buttons = ACTIONS.map((a) => {
    let why = a.from.includes(t.status) ? null : `not while ${words(t.status)}`;
    if (a.key === "dispatch" && t.test_mode) why = "a test ticket is never dispatched";
    return el("button", {
      type: "button", testid: `${a.key}-${t.id}`, class: a.danger ? "danger" : null,
      disabled: Boolean(why), title: why, "aria-label": `${a.label.replace("…", "")} ticket ${t.id}`,
      onclick: () => act(t.id, a),
    }, a.label);
  });
  buttons.push(el("button", {
    type: "button", class: "danger", testid: `valve-${t.id}`, disabled: !t.household_id,
    title: t.household_id ? null : "no household", "aria-label": `Close the valve for ticket ${t.id}`,
    onclick: () => closeValve(t.id),
  }, "Close valve"));
  return buttons;
}

/** Ask for what a step needs with the dialog; resolves to the values, or null when backed out. */
function ask({ title, text = "", department, reason = false, submit }) {
  const dialog = $("#ask");
  $("#ask-title").textContent = title;
  $("#ask-text").textContent = text;
  $("#ask-submit").textContent = submit;
  const fields = { department: department !== undefined, crew: department !== undefined, reason };
  for (const [name, shown] of Object.entries(fields)) {
    const input = $(`#ask-${name}-input`);
    $(`#ask-${name}`).hidden = !shown;
    input.disabled = !shown;
    input.required = shown && name !== "crew";
    input.value = name === "department" && shown ? department : "";
  }
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (dialog.returnValue !== "ok") { resolve(null); return; }
      const values = {};
      for (const [name, shown] of Object.entries(fields)) {
        const value = $(`#ask-${name}-input`).value.trim();
        if (shown && value) values[name] = value;
      }
      resolve(values);
    }, { once: true });
  });
}

function askDispatch(t) {
  return ask({ title: `Dispatch ticket #${t.id}`, text: `${words(t.category)}: ${t.address || t.district || ""}`,
               department: DEPARTMENT_FOR[t.category] || "", submit: "Dispatch" });
}

function askCancel(t) {
  return ask({ title: `Cancel ticket #${t.id}`, text: "A cancelled ticket leaves the queue; say why.",
               reason: true, submit: "Cancel ticket" });
}

async function act(id, action) {
  const t = queue.get(id);
  if (!t) return;
  let body;
  if (action.ask) {
    body = await action.ask(t);
    if (body === null) return;
  }
  setBusy(id, true);
  try {
    const updated = await api("POST", `/api/tickets/${id}/${action.path}`, body);
    say(`Ticket #${id}: ${words(updated.status)}.`);
    if (newer(updated)) remember(updated);
    renderQueue();
    if (id === selected) refreshDetailSoon();
  } catch (err) {
    fail(`Ticket #${id}`, err);
  } finally {
    setBusy(id, false);
  }
}

async function closeValve(id) {
  const t = queue.get(id);
  if (!t) return;
  const sure = await ask({ title: `Close the valve for ticket #${id}?`,
    text: `The gas supply of ${t.address || t.household_id} is cut until a technician on site reopens it.`,
    submit: "Close valve" });
  if (sure === null) return;
  setBusy(id, true);
  try {
    const sent = await api("POST", `/api/tickets/${id}/valve`, { action: "close_valve" });
    say(`Ticket #${id}: close-valve command ${sent.command_id} sent to the gateway.`);
    if (id === selected) refreshDetailSoon();
  } catch (err) {
    fail(`Ticket #${id}`, err);
  } finally {
    setBusy(id, false);
  }
}

/** While a request runs the ticket's buttons wait (no double dispatch); then the row is made
    again from the ticket's state. */
function setBusy(id, busy) {
  if (busy) {
    rows.get(id)?.querySelectorAll(".actions button").forEach((b) => { b.disabled = true; });
    return;
  }
  rows.get(id)?.remove();
  rows.delete(id);
  renderQueue();
}

/* ---------------------------------------------------------------- the live feed */
let source = null;
let retry = null;
let retryDelay = 1000;

function setLive(state) {
  $("#live").dataset.state = state;
  $("#live").textContent = state;
}

/** Follow the live feed. Every (re)connection starts with ``hello``, and the queue is read
    again then, so nothing that happened while disconnected is missed. */
function connectLive() {
  stopLive();
  setLive("connecting");
  const feed = new EventSource("/api/events");
  source = feed;
  const mine = (handler) => (event) => { if (source === feed) handler(event); };
  feed.addEventListener("hello", mine(() => { retryDelay = 1000; setLive("live"); loadQueue(); }));
  feed.addEventListener("ticket", mine((e) => onTicketEvent(JSON.parse(e.data))));
  feed.addEventListener("resync", mine(() => loadQueue()));
  feed.addEventListener("error", mine(() => {
    if (feed.readyState !== EventSource.CLOSED) { setLive("reconnecting"); return; }  // the browser retries
    setLive("offline");  // the browser gave up: the hotline refused the feed, or is down
    retry = setTimeout(reconnect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 30000);
  }));
}

async function reconnect() {
  try {
    await api("GET", "/api/auth/me");
  } catch (err) {
    if (err.status === 401) return;  // signed out: the sign-in form is showing
  }
  connectLive();
}

function stopLive() {
  clearTimeout(retry);
  source?.close();
  source = null;
  setLive("offline");
}

/* ---------------------------------------------------------------- the detail pane */
let detailSeq = 0;
let detailTimer = null;

function select(id) {
  selected = id;
  for (const [rowId, row] of rows) row.setAttribute("aria-selected", String(rowId === id));
  loadDetail(id);
}

function refreshDetailSoon() {  // several events of one change make one reload
  clearTimeout(detailTimer);
  detailTimer = setTimeout(() => { if (selected !== null) loadDetail(selected); }, 150);
}

async function loadDetail(id) {
  const seq = ++detailSeq;
  try {
    const [ticket, evidence] = await Promise.all([
      api("GET", `/api/tickets/${id}`),
      api("GET", `/api/tickets/${id}/evidence?hours=${EVIDENCE_HOURS}`)
        .catch((err) => ({ error: err.message })),
    ]);
    if (seq === detailSeq) renderDetail(ticket, evidence);
  } catch (err) {
    if (seq === detailSeq) fail(`Ticket #${id}`, err);
  }
}

function renderDetail(t, evidence) {
  const pane = $("#detail");
  const item = (term, ...value) => [el("dt", {}, term), el("dd", {}, ...value)];
  pane.replaceChildren(
    el("h2", { testid: "detail-title" }, `#${t.id} ${words(t.category)}: ${words(t.cause)} `,
      el("span", { class: `badge ${t.priority}` }, t.priority),
      t.test_mode && el("span", { class: "badge test" }, "TEST")),
    el("dl", {},
      item("Household", el("span", { testid: "detail-household" },
        t.household_id ? `${t.household_id}, ${t.address || "address unknown"}` : "none (district incident)")),
      item("District", t.district || ""),
      item("Device", el("span", { testid: "detail-device" }, t.device_id || "none")),
      item("What", t.summary),
      item("Source", `${t.source}, confidence ${t.confidence}`,
        t.repeats > 0 && !t.is_incident ? `, repeated ${t.repeats}×` : ""),
      item("Status", el("span", { testid: "detail-status" }, words(t.status)),
        t.cancel_reason ? ` (${t.cancel_reason})` : ""),
      item("Owner", t.owner),
      t.department && item("Sent to", `${t.department}${t.crew ? ` / ${t.crew}` : ""}`),
      item("Opened", stamp(t.opened_at)),
      t.on_site_due && item("On site by", `${stamp(t.on_site_due)} `,
        dueElement("", t.on_site_due, "detail-on-site-due"), t.on_site_breached ? " (breached)" : ""),
      item("Resolved by", `${stamp(t.resolve_due)} `,
        dueElement("", t.resolve_due, "detail-resolve-due"), t.resolve_breached ? " (breached)" : ""),
      item("Escalation", `level ${t.escalation_level}`),
      t.is_incident && item("Incident", `${t.households_under} household tickets held under it`),
      item("Valve", el("span", { testid: "detail-valve-state" }, t.valve_state || "not reported")),
    ),
    el("h3", {}, evidence.unit
      ? `Evidence: ${MEASURE[evidence.field] || evidence.field} (${evidence.unit}) at ${evidence.device_id}, last ${EVIDENCE_HOURS} h`
      : "Evidence"),
    evidenceChart(t, evidence),
    el("h3", {}, "Valve commands"),
    t.valve_commands.length
      ? el("table", { testid: "detail-valve-commands" },
          el("tr", {}, ["Command", "Action", "Device", "Status", "Requested", "By"].map((h) => el("th", { scope: "col" }, h))),
          t.valve_commands.map((c) => el("tr", { testid: `valve-command-${c.id}` },
            el("td", {}, c.id), el("td", {}, words(c.action)), el("td", {}, c.device_id),
            el("td", {}, c.status, c.reason ? `: ${c.reason}` : ""), el("td", {}, clock(c.requested_at)),
            el("td", {}, c.requested_by))))
      : el("p", { class: "small" }, "None."),
    el("h3", {}, "Devices"),
    el("p", {}, t.devices.map((d) => `${d.id} (${d.kind}${d.meter_size ? ` ${d.meter_size}` : ""}${d.test_mode ? ", test mode" : ""})`).join(", ") || "None."),
    el("h3", {}, "History"),
    el("ol", { testid: "detail-history" }, t.events.map((e) =>
      el("li", { testid: `event-${e.id}`, "data-kind": e.kind },
        el("time", { datetime: e.at, title: stamp(e.at) }, clock(e.at)), " ",
        el("strong", {}, words(e.kind)), ` by ${e.actor}`,
        Object.keys(e.detail).length ? el("div", { class: "small" }, describeEvent(e.detail)) : null))),
  );
}

function describeEvent(detail) {
  return Object.entries(detail).filter(([, v]) => v !== null && v !== "")
    .map(([k, v]) => `${words(k)}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(" · ");
}

/** The device's recent readings as a small line chart (gaps where the device was silent). */
function evidenceChart(t, evidence) {
  if (!t.device_id) return el("p", { class: "small", testid: "detail-chart-empty" }, "No device: nothing to chart.");
  if (evidence.error) return el("p", { class: "small", testid: "detail-chart-empty" }, `No evidence: ${evidence.error}`);
  const points = evidence.points.filter((p) => !p.comm_lost && p.value !== null);
  if (!points.length) {
    return el("p", { class: "small", testid: "detail-chart-empty" }, `No readings in the last ${EVIDENCE_HOURS} hours.`);
  }
  const W = 360, H = 150, L = 40, R = 10, T = 12, B = 24;
  const t0 = Date.parse(evidence.points[0].ts);
  const t1 = Math.max(Date.parse(evidence.points.at(-1).ts), t0 + 60000);
  const values = points.map((p) => p.value);
  const low = Math.min(0, ...values), high = Math.max(...values, low + 1) * 1.1;
  const x = (ts) => (L + ((Date.parse(ts) - t0) / (t1 - t0)) * (W - L - R)).toFixed(1);
  const y = (v) => (H - B - ((v - low) / (high - low)) * (H - T - B)).toFixed(1);
  const NS = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs = {}, text) => {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const last = points.at(-1);
  const latestValue = Number(last.value.toFixed(2));
  const title = `${MEASURE[evidence.field] || evidence.field} at ${evidence.device_id}: ${points.length} readings, latest ${latestValue} ${evidence.unit}`;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title,
                             "data-testid": "detail-chart", "data-points": points.length });
  chart.append(svg("title", {}, title),
    svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    svg("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, high.toFixed(high < 10 ? 1 : 0)),
    svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, low.toFixed(0)),
    svg("text", { x: L, y: H - 8 }, clock(t0).slice(0, 5)),
    svg("text", { x: W - R, y: H - 8, "text-anchor": "end" }, clock(t1).slice(0, 5)),
    svg("text", { x: L + 4, y: T + 8 }, evidence.unit));
  let run = [];  // consecutive good readings make one line; a silence or a gap breaks it
  const flush = () => {
    if (run.length > 1) chart.append(svg("polyline", { class: "line", points: run.join(" ") }));
    run = [];
  };
  for (const p of evidence.points) {
    if (p.comm_lost || p.value === null) {
      flush();
      chart.append(svg("line", { class: "lost", x1: x(p.ts), y1: H - B, x2: x(p.ts), y2: H - B - 4 }));
    } else {
      run.push(`${x(p.ts)},${y(p.value)}`);
    }
  }
  flush();
  chart.append(svg("circle", { class: "last", cx: x(last.ts), cy: y(last.value), r: 3 }),
    svg("text", { x: Math.min(Number(x(last.ts)) + 4, W - R - 24), y: Number(y(last.value)) - 4 },
      String(latestValue)));
  return chart;
}

/* ---------------------------------------------------------------- start */
(async () => {
  try { signedIn(await api("GET", "/api/auth/me")); } catch (err) {
    if (err.status !== 401) say(err.message, "error");
    signedOut();
  }
})();
