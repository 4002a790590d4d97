// Domain events with the runs their subscriptions started; schedules with
// their next tick; queues with their load and limits.

import { api } from "./api.js";
import { clear, fmtDuration, fmtRelative, h, listOf, runLink, statusBadge, timeEl } from "./util.js";

function table(testid, columns, rows, empty) {
  return h("div", { class: "table-wrap" }, h("table", { "data-testid": testid },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.num ? "num" : null }, c.label || c)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, empty)))));
}

function failure(err) {
  return h("p", { class: "notice bad", role: "alert" }, err.message);
}

/** Re-run `load` every `ms` while the page is shown. */
function polling(load, ms) {
  const timer = setInterval(load, ms);
  return { dispose: () => clearInterval(timer) };
}

// --- events ----------------------------------------------------------------

function eventRow(ev) {
  const runs = listOf(ev.runs, "runs");
  const data = ev.data === undefined ? null : ev.data;
  const text = JSON.stringify(data);
  return h("tr", { "data-testid": "event-row", "data-event-id": ev.event_id || ev.id || "" },
    h("td", {}, timeEl(ev.time)),
    h("td", {}, h("strong", {}, ev.name)),
    h("td", {}, ev.key ? h("code", {}, ev.key) : "–"),
    h("td", {}, ev.source || "–"),
    h("td", {}, text && text.length > 80
      ? h("details", {}, h("summary", {}, h("code", {}, `${text.slice(0, 77)}…`)), h("pre", { class: "json" }, JSON.stringify(data, null, 2)))
      : h("code", {}, text)),
    h("td", { "data-testid": "event-runs" }, runs.length
      ? h("ul", { class: "plain" }, runs.map((r) => h("li", {}, runLink(r.run_id), ` ${r.task_id || ""} `,
        r.status ? statusBadge(r.status, r.dead_lettered) : null)))
      : h("span", { class: "muted" }, "no subscription matched")));
}

export async function mountEvents(container, route) {
  const name = route.query.get("name") || "";
  const input = h("input", { id: "event-name", name: "name", type: "search", value: name,
    placeholder: "e.g. user.created", "data-testid": "filter-name" });
  const form = h("form", { class: "filters panel", role: "search", "aria-label": "Filter events" },
    h("div", { class: "field" }, h("label", { for: "event-name" }, "Event name"), input),
    h("div", { class: "field" }, h("button", { type: "submit", class: "primary" }, "Apply")));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = input.value.trim();
    location.hash = value ? `#/events?name=${encodeURIComponent(value)}` : "#/events";
  });
  const body = h("div");
  const older = h("button", { type: "button", "data-testid": "page-older" }, "Older →");
  const newer = h("button", { type: "button", "data-testid": "page-newer" }, "← Newer");
  const status = h("span", { class: "muted", role: "status" });
  container.append(
    h("div", { class: "page-head" }, h("h1", {}, "Events"),
      h("span", { class: "muted" }, "Domain events, newest first, with the runs their subscriptions started.")),
    form, body, h("div", { class: "pager" }, newer, older, status));

  const cursors = [];
  let cursor = null;
  let next = null;
  let shown = null;
  const load = async (at) => {
    try {
      const answer = await api("/v1/events", { query: { name, limit: 50, cursor: at } });
      // Polling: leave the page (and any opened data) alone when nothing changed.
      const text = JSON.stringify(answer);
      if (at === cursor && text === shown) return;
      shown = text;
      cursor = at;
      next = (answer && answer.next_cursor) || null;
      const events = listOf(answer, "events");
      clear(body, table("events-table",
        ["Time", "Name", "Key", "Source", "Data", "Runs started"], events.map(eventRow),
        name ? `No events named ${name}.` : "No events yet. Publish one with `stepline publish` or POST /v1/events."));
      older.disabled = !next;
      newer.disabled = cursor === null;
      status.textContent = `${events.length} event${events.length === 1 ? "" : "s"}`;
    } catch (err) {
      clear(body, failure(err));
    }
  };
  older.addEventListener("click", () => {
    cursors.push(cursor);
    load(next);
  });
  newer.addEventListener("click", () => load(cursors.pop() ?? null));
  await load(null);
  // New events are not streamed: look for them now and then.
  const poll = polling(() => cursor === null && load(null), 3000);
  let pending = null;
  return {
    // A run a subscription started (its idempotency key is "stepline/event/<event id>",
    // a format that never changes) changed: show its status now.
    onRun(run) {
      if (cursor !== null || pending || !(run.idempotency_key || "").startsWith("stepline/event/")) return;
      pending = setTimeout(() => {
        pending = null;
        load(null);
      }, 200);
    },
    dispose() {
      poll.dispose();
      if (pending) clearTimeout(pending);
    },
  };
}

// --- schedules -------------------------------------------------------------

export async function mountSchedules(container) {
  const body = h("div");
  container.append(h("div", { class: "page-head" }, h("h1", {}, "Schedules"),
    h("span", { class: "muted" }, "Scheduled tasks of the server's app, and when each fires next.")), body);
  const load = async () => {
    try {
      const schedules = listOf(await api("/v1/schedules"), "schedules");
      clear(body, table("schedules-table", ["Task", "Schedule", "Next tick", "In", "Last run"],
        schedules.map((sc) => {
          const next = sc.next_tick_ms ?? null;
          const last = sc.last_run;
          return h("tr", { "data-testid": "schedule-row", "data-task-id": sc.task_id },
            h("td", {}, h("a", { href: `#/runs?task=${encodeURIComponent(sc.task_id)}` }, sc.task_id)),
            h("td", {}, h("code", {}, sc.schedule)),
            h("td", {}, next !== null ? timeEl(next) : sc.next_tick || "–"),
            h("td", {}, next !== null ? fmtRelative(next) : "–"),
            h("td", {}, last ? [runLink(last.run_id), " ", statusBadge(last.status, last.dead_lettered)]
              : h("span", { class: "muted" }, "none yet")));
        }), "No scheduled tasks (or the server was started without the app module)."));
    } catch (err) {
      clear(body, failure(err));
    }
  };
  await load();
  return polling(load, 5000);
}

// --- queues ----------------------------------------------------------------

export async function mountQueues(container) {
  const body = h("div");
  container.append(h("div", { class: "page-head" }, h("h1", {}, "Queues"),
    h("span", { class: "muted" }, "Runs waiting and running per queue, against its limits.")), body);
  const load = async () => {
    try {
      const queues = listOf(await api("/v1/queues"), "queues");
      const num = (label) => ({ label, num: true });
      clear(body, table("queues-table",
        ["Queue", num("Pending"), num("Running"), num("Retrying"), num("Suspended"), num("Limit"),
          num("Per-key limit"), num("Rate limit")],
        queues.map((q) => h("tr", { "data-testid": "queue-row", "data-queue": q.name },
          h("td", {}, h("code", {}, q.name)),
          h("td", { class: "num" }, q.pending ?? "–"),
          h("td", { class: "num" }, q.running ?? "–"),
          h("td", { class: "num" }, q.retrying ?? "–"),
          h("td", { class: "num" }, q.suspended ?? "–"),
          h("td", { class: "num", "data-testid": "queue-limit" }, q.limit ?? "none"),
          h("td", { class: "num" }, q.key_limit ?? "none"),
          h("td", { class: "num" }, q.rate_limit ? `${q.rate_limit.limit} / ${fmtDuration(q.rate_limit.period_ms)}` : "none"))),
        "No queues yet."));
    } catch (err) {
      clear(body, failure(err));
    }
  };
  await load();
  return polling(load, 3000);
}
