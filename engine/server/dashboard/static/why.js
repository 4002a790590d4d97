// "Why is this run not running?" (`stepline runs why` in the browser): for
// a pending, suspended (sleeping, waiting) or retrying run, what holds it:
// its queue place and the runs holding the slots, the concurrency key's
// holders, the rate limit, a pause, the wait and since when, the TTL, the
// pool. Reads GET /v1/runs/{id}/why.

import { api } from "./api.js";
import { h, runLink, timeEl } from "./util.js";

/** The statuses the panel explains: live, but not executing. */
export const HELD_STATUSES = ["pending", "suspended", "retrying"];

// The facts worth a second line, by the reason's field that holds them.
const TIMES = { since: "since", timeout_at: "times out", next_free_at: "next free", not_before: "may start",
  retry_at: "retries", expires_at: "expires", at: "paused at" };

function facts(reason) {
  const parts = [];
  for (const [key, label] of Object.entries(TIMES)) {
    if (typeof reason[key] === "number") parts.push(h("span", { class: "fact", "data-fact": key }, `${label} `, timeEl(reason[key])));
  }
  if (Array.isArray(reason.holders) && reason.holders.length) {
    parts.push(h("span", { class: "fact", "data-testid": "why-holders" }, "held by ",
      reason.holders.map((r, i) => [i ? ", " : "", runLink(r)])));
  }
  if (reason.by) parts.push(h("span", { class: "fact" }, `by ${reason.by}`));
  return parts.length ? h("p", { class: "muted facts-line" }, parts) : null;
}

export function whyPanel(runId) {
  const list = h("ul", { class: "plain why", "data-testid": "why-reasons" });
  const message = h("p", { class: "error", role: "status", "aria-live": "polite", "data-testid": "why-message", hidden: true });
  const element = h("section", { class: "panel", "data-testid": "why-panel", "aria-labelledby": "why-title" },
    h("h2", { id: "why-title" }, "Why is this run not running?"), message, list);
  return {
    element,
    async refresh() {
      try {
        const answer = await api(`/v1/runs/${encodeURIComponent(runId)}/why`);
        message.textContent = "";
        message.hidden = true;
        element.dataset.status = answer.status;
        list.replaceChildren(...answer.reasons.map((r) => h("li", { "data-testid": "why-reason", "data-kind": r.kind },
          h("span", { class: `badge ${r.kind === "wait" ? "waiting" : "idle"}` }, r.kind.replace("_", " ")), " ",
          h("span", { "data-testid": "why-text" }, r.message), facts(r))));
      } catch (err) {
        message.textContent = `Could not ask why: ${err.message}`;
        message.hidden = false;
      }
    },
  };
}
