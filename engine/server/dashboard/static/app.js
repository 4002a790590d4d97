// Entry point: token, hash routing, and the live stream fanned out to the
// page on show.
//
// Routes:  #/runs?task=..&status=..   #/runs/<run id>   #/dead-letters
//          #/events   #/schedules   #/queues
// Every view is `mount(container, route) -> {onRun?(summary), onResync?(), dispose?()}`.

import { api, auth, discoverAuth, RunStream } from "./api.js";
import { clear, h } from "./util.js";
import { mountRuns, mountDeadLetters } from "./runs.js";
import { mountRun } from "./run.js";
import { mountEvents, mountQueues, mountSchedules } from "./pages.js";

const view = document.getElementById("view");
const liveEl = document.querySelector("[data-testid=live-status]");
let current = null;

function parseRoute() {
  const raw = location.hash.replace(/^#/, "") || "/runs";
  const [path, qs] = raw.split("?", 2);
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, query: new URLSearchParams(qs || "") };
}

function viewFor(route) {
  const [first, second] = route.parts;
  if (first === "runs" && second) return { nav: "runs", mount: mountRun, title: `Run ${second}` };
  if (first === "dead-letters") return { nav: "dead-letters", mount: mountDeadLetters, title: "Dead letters" };
  if (first === "events") return { nav: "events", mount: mountEvents, title: "Events" };
  if (first === "schedules") return { nav: "schedules", mount: mountSchedules, title: "Schedules" };
  if (first === "queues") return { nav: "queues", mount: mountQueues, title: "Queues" };
  return { nav: "runs", mount: mountRuns, title: "Runs" };
}

let shown = 0; // which show() is the latest: a slow page must not replace a newer one

async function show() {
  if (current && current.dispose) current.dispose();
  current = null;
  const seq = ++shown;
  const route = parseRoute();
  const target = viewFor(route);
  document.title = `${target.title} · Stepline`;
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === target.nav) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  clear(view);
  try {
    const mounted = (await target.mount(view, route)) || {};
    if (seq === shown) current = mounted;
    else if (mounted.dispose) mounted.dispose();
  } catch (err) {
    if (seq === shown) {
      clear(view, h("p", { class: "notice bad", role: "alert" }, `Could not load this page: ${err.message}`));
    }
  }
}

function askForToken(message) {
  const dialog = document.getElementById("token-dialog");
  const form = document.getElementById("token-form");
  const input = document.getElementById("token-input");
  document.getElementById("token-error").textContent = message || "";
  return new Promise((resolve) => {
    const submit = (ev) => {
      ev.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      auth.token = token;
      input.value = "";
      form.removeEventListener("submit", submit);
      dialog.close();
      resolve(token);
    };
    form.addEventListener("submit", submit);
    // Escape would leave the page without a token: keep the dialog up.
    dialog.addEventListener("cancel", (ev) => ev.preventDefault(), { once: true });
    if (!dialog.open) dialog.showModal();
    input.focus();
  });
}

function setLive(state) {
  liveEl.dataset.state = state;
  liveEl.textContent = { live: "live", connecting: "connecting…", off: "offline" }[state] || state;
}

async function start() {
  const info = await discoverAuth();
  if (info.version) document.querySelector(".brand").title = `Stepline ${info.version}`;
  const stream = new RunStream(
    (summary) => current && current.onRun && current.onRun(summary),
    () => current && current.onResync && current.onResync(),
    setLive,
  );
  auth.onUnauthorized = async (message) => {
    const token = await askForToken(message);
    stream.open(); // reconnect with the new token
    return token;
  };
  if (auth.required) {
    const signOut = document.getElementById("sign-out");
    signOut.hidden = false;
    signOut.addEventListener("click", () => {
      auth.token = null;
      location.reload();
    });
    if (!auth.token) await askForToken();
    // A token kept from earlier may be stale: a refusal here asks again
    // before the stream connects with it.
    await api("/v1/runs", { query: { limit: 1 } });
  }
  stream.open();
  window.addEventListener("hashchange", show);
  await show();
}

start().catch((err) => {
  clear(view, h("p", { class: "notice bad", role: "alert" }, `The dashboard could not start: ${err.message}`));
});
