"use strict";
/* The call-taker's side of the console: find the caller's household by address, phone or
   meter number, see what is already open there (first), and open a ticket for the call, or
   join the open one (a neighbour reporting the same leak). Loaded after console.js, whose
   helpers it uses: $, el, api, say, fail, words, stamp, select, remember, newer, renderQueue. */

const TAKES_CALLS = ["call_taker", "dispatcher", "admin"];  // the roles with tickets.create
const SEARCH_DELAY = 250;  // ms of quiet typing before the household search runs
const MIN_QUERY = 2;
const CAUSE_FOR = { emergency_repair: "gas_leak" };  // else the cause is the category's own
const CALL_FAILED = "The call was not saved";

let chosen = null;       // the household chosen for the call, or null (a call without one)
let causeChosen = false; // the call-taker picked a cause: a new category no longer replaces it
let searchSeq = 0;
let searchTimer = null;

const digitsOf = (text) => String(text ?? "").replace(/\D/g, "");
const callInput = (name) => $(`#call-${name}`);

/* ---------------------------------------------------------------- opening and closing */
function openCall() {
  $("#call").hidden = false;
  $("#new-call").setAttribute("aria-expanded", "true");
  callInput("search").focus();
}

function closeCall() {  // what was typed stays, for when the panel is opened again
  $("#call").hidden = true;
  $("#new-call").setAttribute("aria-expanded", "false");
  $("#new-call").focus();
}

$("#new-call").addEventListener("click", () => { if ($("#call").hidden) openCall(); else closeCall(); });
$("#call-close").addEventListener("click", closeCall);
$("#call").addEventListener("keydown", (event) => {
  if (event.key === "Escape") { event.preventDefault(); closeCall(); }
});

/** N opens the panel from anywhere on the page but a text field or a dialog. */
document.addEventListener("keydown", (event) => {
  if (event.key?.toLowerCase() !== "n" || event.ctrlKey || event.altKey || event.metaKey) return;
  if ($("#new-call").hidden || document.querySelector("dialog[open]")) return;
  if (event.target.closest("input, textarea, select, [contenteditable]")) return;
  event.preventDefault();
  openCall();
});

function showForRole(me) {
  $("#new-call").hidden = !TAKES_CALLS.includes(me.role);
  if ($("#new-call").hidden) $("#call").hidden = true;
}

document.addEventListener("gasguard:signed-in", (event) => showForRole(event.detail));
document.addEventListener("gasguard:signed-out", () => {  // nothing stays for the next user
  $("#new-call").hidden = true;
  $("#call").hidden = true;
  $("#new-call").setAttribute("aria-expanded", "false");
  resetCall();
});
if (user) showForRole(user);  // signed in before this script ran

/* ---------------------------------------------------------------- the household search */
callInput("search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(searchNow, SEARCH_DELAY);
});
callInput("search").addEventListener("keydown", (event) => {
  if (event.key === "Enter") { event.preventDefault(); clearTimeout(searchTimer); searchNow(); }
  if (event.key === "ArrowDown") {  // into the results
    const first = $("#call-results button");
    if (first) { event.preventDefault(); first.focus(); }
  }
});

function searchHint(text) {
  $("#call-search-hint").textContent = text;
}

async function searchNow() {
  const query = callInput("search").value.trim();
  const seq = ++searchSeq;
  if (query.length < MIN_QUERY) {
    $("#call-results").replaceChildren();
    searchHint(`Type at least ${MIN_QUERY} characters.`);
    return;
  }
  searchHint("Searching…");
  try {
    const found = await api("GET", `/api/households?q=${encodeURIComponent(query)}`);
    if (seq !== searchSeq) return;  // a newer search is under way
    // households with something open come first: the call is most likely about that
    found.sort((a, b) => (b.open_tickets.length > 0) - (a.open_tickets.length > 0));
    $("#call-results").replaceChildren(...found.map((h) => resultItem(h, query)));
    searchHint(found.length
      ? `${found.length} household${found.length === 1 ? "" : "s"} match “${query}”.`
      : `No household matches “${query}”: a call without a household is possible.`);
  } catch (err) {
    if (seq !== searchSeq) return;
    searchHint("The search failed.");
    fail("The household search failed", err);
  }
}

function resultItem(h, query) {
  const ids = (kind) => h.devices.filter((d) => d.kind === kind)
    .map((d) => `${d.id}${d.meter_size ? ` (${d.meter_size})` : ""}${d.test_mode ? " test mode" : ""}`)
    .join(", ") || "none";
  const open = h.open_tickets;
  return el("li", { testid: `call-result-${h.id}`, "data-household": h.id,
                    class: h.id === chosen?.id ? "chosen" : null },
    open.length > 0 && el("div", { class: "call-open", testid: `call-open-${h.id}` },
      el("strong", {}, open.length === 1 ? "Open ticket here" : `${open.length} open tickets here`),
      el("ul", {}, open.map((t) => openTicketItem(h, t, query)))),
    el("div", {}, el("strong", { class: "call-address" }, h.address), ` ${h.id} · ${h.district}`),
    el("div", { class: "small" }, `phone ${h.phone || "not known"} · meter ${ids("meter")} · detector ${ids("detector")}`),
    el("button", { type: "button", testid: `call-choose-${h.id}`, "aria-label": `Choose ${h.id}, ${h.address}`,
                   onclick: () => choose(h, query) }, "Choose"));
}

function openTicketItem(h, t, query) {
  return el("li", { testid: `call-open-ticket-${t.id}` },
    el("span", { class: `badge ${t.priority}` }, t.priority),
    el("button", { type: "button", class: "ticket-link", "aria-label": `Show ticket ${t.id}`,
                   onclick: () => select(t.id) }, `#${t.id}`),
    ` ${words(t.status)} · ${words(t.category)}: ${words(t.cause)} · owner ${t.owner} · opened ${stamp(t.opened_at)} `,
    el("button", { type: "button", testid: `call-same-${t.id}`,
                   title: "the caller reports this: the call joins the ticket",
                   onclick: () => sameProblem(h, t, query) }, "Same problem"));
}

/* ---------------------------------------------------------------- the form */
/** The household the call is about; ``query`` found it (by phone: then it is the caller's). */
function choose(h, query) {
  chosen = h;
  $("#call-household").textContent = `${h.id}, ${h.address} (${h.district})`;
  $("#call-household-clear").hidden = false;
  const note = $("#call-household-note");
  note.hidden = h.open_tickets.length === 0;
  note.textContent = h.open_tickets.length
    ? `Open here: ${h.open_tickets.map((t) => `#${t.id} ${words(t.cause)} (${words(t.status)})`).join(", ")}. `
      + "A call with the same cause joins that ticket."
    : "";
  const phone = callInput("caller-phone");
  const byPhone = digitsOf(query).length >= 3 && digitsOf(query) === digitsOf(h.phone);
  if (!phone.value && byPhone && /^[0-9+() -]{3,32}$/.test(h.phone)) phone.value = h.phone;
  for (const item of $("#call-results").children) {
    item.classList.toggle("chosen", item.dataset.household === h.id);
  }
  callInput("category").focus();
}

function sameProblem(h, t, query) {
  choose(h, query);
  callInput("category").value = t.category;
  setCause(t.cause === t.category ? "" : t.cause);
  causeChosen = true;
  callInput("summary").focus();
}

function forgetHousehold() {
  chosen = null;
  $("#call-household").textContent = "none: a call without a household (an enquiry)";
  $("#call-household-clear").hidden = true;
  $("#call-household-note").hidden = true;
  for (const item of $("#call-results").children) item.classList.remove("chosen");
}

$("#call-household-clear").addEventListener("click", () => { forgetHousehold(); callInput("search").focus(); });

/** A known cause is picked in the list; any other is typed. */
function setCause(cause) {
  const known = [...callInput("cause").options].some((o) => o.value === cause && cause !== "other");
  callInput("cause").value = known ? cause : "other";
  callInput("cause-other").value = known ? "" : cause;
  showOtherCause();
}

function showOtherCause() {
  const other = callInput("cause").value === "other";
  callInput("cause-other").hidden = !other;
  callInput("cause-other").disabled = !other;
  callInput("cause-other").required = other;
}

/** The cause as the API takes it: one word ("smell in cellar" -> "smell_in_cellar"), or none
    (the category's own). */
function causeValue() {
  const picked = callInput("cause").value;
  if (picked !== "other") return picked || null;
  return callInput("cause-other").value.trim().toLowerCase().replace(/\s+/g, "_") || null;
}

callInput("category").addEventListener("change", () => {
  if (!causeChosen) setCause(CAUSE_FOR[callInput("category").value] || "");
});
callInput("cause").addEventListener("change", () => {
  causeChosen = true;
  showOtherCause();
  if (callInput("cause").value === "other") callInput("cause-other").focus();
});
callInput("summary").addEventListener("input", () => callInput("summary").setCustomValidity(""));

/** The form (the Clear button), and with it the household and the outcome shown. */
$("#call-form").addEventListener("reset", () => {
  causeChosen = false;
  forgetHousehold();
  callInput("summary").setCustomValidity("");
  $("#call-outcome").textContent = "";
  delete $("#call-outcome").dataset.joined;
  setTimeout(showOtherCause);  // once the form has put the cause back
});

/** Ready for the next call: the form, the search and its results. */
function resetCall() {
  $("#call-form").reset();
  callInput("search").value = "";
  clearTimeout(searchTimer);
  searchSeq += 1;  // a search still running is not shown
  $("#call-results").replaceChildren();
  searchHint(`Type at least ${MIN_QUERY} characters.`);
}

$("#call-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const summary = callInput("summary").value.trim();
  if (!summary) {
    callInput("summary").setCustomValidity("Say what the caller reports.");
    callInput("summary").reportValidity();
    return;
  }
  const body = { category: callInput("category").value, summary };
  const optional = {
    cause: causeValue(), priority: callInput("priority").value, household_id: chosen?.id,
    caller_name: callInput("caller-name").value.trim(), caller_phone: callInput("caller-phone").value.trim(),
  };
  for (const [key, value] of Object.entries(optional)) if (value) body[key] = value;
  const submit = $("#call-form [type=submit]");
  submit.disabled = true;  // one call, one ticket
  try {
    const created = await api("POST", "/api/tickets", body);
    if (newer(created.ticket)) remember(created.ticket);
    renderQueue();
    resetCall();
    $("#call-outcome").textContent = created.joined
      ? `Joined ticket #${created.id} (already open for this household).`
      : `Ticket #${created.id} opened.`;
    $("#call-outcome").dataset.joined = String(created.joined);
    if ($("#message-text").textContent.startsWith(CALL_FAILED)) $("#message").hidden = true;
    select(created.id);
    callInput("search").focus();  // ready for the next call
  } catch (err) {
    fail(CALL_FAILED, err);
  } finally {
    submit.disabled = false;
  }
});

forgetHousehold();
