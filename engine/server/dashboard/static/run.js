// One run: facts, actions (cancel, retry with an edited payload), the
// timeline, then every step with its input, output, logs and errors, the
// retry history, the wake condition of a suspended run, parent and
// children, and the raw event history. Follows the stream while shown.
// Time travel (travel.js) shows all of it as of a past point; a held run
// says why it is not running (why.js); any run diffs with another (diff.js).

import { api } from "./api.js";
import { diffPanel } from "./diff.js";
import { forkPanel, shadowPanel } from "./history.js";
import { retryForm } from "./retry.js";
import { renderTimeline } from "./timeline.js";
import { travelPanel } from "./travel.js";
import { HELD_STATUSES, whyPanel } from "./why.js";
import {
  clear, fmtDuration, fmtRelative, h, jsonBlock, listOf, LIVE_STATUSES, runLink, statusBadge, timeEl,
} from "./util.js";

function fact(label, ...value) {
  return [h("dt", {}, label), h("dd", {}, ...value)];
}

function stack(text, testid) {
  return h("pre", { class: "stack", "data-testid": testid }, text);
}

function errorBlock(err, testid = "error") {
  return h("div", { "data-testid": testid },
    h("p", { class: "error" }, h("strong", {}, err.type), `: ${err.message}`),
    err.stack ? h("details", {}, h("summary", {}, "Stack trace"), stack(err.stack, "stack")) : null);
}

function logsTable(logs) {
  if (!logs.length) return h("p", { class: "muted" }, "No logs.");
  return h("div", { class: "table-wrap" }, h("table", { "data-testid": "logs" },
    h("thead", {}, h("tr", {}, ["Time", "Level", "Attempt", "Step", "Message", "Fields"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, logs.map((lg) => h("tr", { "data-testid": "log-line" },
      h("td", {}, timeEl(lg.time)),
      h("td", {}, h("span", { class: `log-level ${lg.level.toLowerCase()}` }, lg.level)),
      h("td", { class: "num" }, lg.attempt),
      h("td", { class: "num" }, lg.step ?? "–"),
      h("td", {}, lg.message),
      h("td", {}, lg.fields && Object.keys(lg.fields).length ? h("code", {}, JSON.stringify(lg.fields)) : ""))))));
}

function header(run, now) {
  const took = run.started_at ? fmtDuration((run.ended_at ?? now) - run.started_at) : "–";
  return h("section", { class: "panel", "aria-labelledby": "run-title" },
    h("div", { class: "page-head" },
      h("h1", { id: "run-title" }, run.task_id),
      h("code", { "data-testid": "run-id" }, run.run_id),
      statusBadge(run.status, run.dead_lettered)),
    h("dl", { class: "facts" },
      fact("Attempt", String(run.attempt)),
      fact("Created", timeEl(run.created_at)),
      fact("Started", timeEl(run.started_at)),
      fact("Ended", timeEl(run.ended_at)),
      fact("Duration", took),
      fact("Queue", run.queue || "–", run.concurrency_key ? ` · key ${run.concurrency_key}` : ""),
      fact("Priority", String(run.priority ?? 0)),
      fact("Tags", (run.tags || []).length ? run.tags.map((t) => h("span", { class: "tag" }, t)) : "–"),
      run.idempotency_key ? fact("Idempotency key", h("code", {}, run.idempotency_key)) : null,
      run.retry_at ? fact("Next attempt", timeEl(run.retry_at), ` (${fmtRelative(run.retry_at)})`) : null,
      run.expires_at ? fact("Expires", timeEl(run.expires_at)) : null,
      run.parent_run_id ? fact("Parent", h("span", { "data-testid": "parent" }, runLink(run.parent_run_id),
        run.parent_step !== null && run.parent_step !== undefined ? ` (step ${run.parent_step})` : "")) : null,
      run.forked_from ? fact("Forked from", h("span", { "data-testid": "forked-from" }, runLink(run.forked_from),
        ` at step ${run.forked_at_step}`)) : null,
      run.task_version ? fact("Task version", h("code", { "data-testid": "task-version" }, run.task_version)) : null,
      (run.patches || []).length ? fact("Patches", run.patches.map((p) =>
        h("span", { class: "tag", "data-testid": "patch" }, `${p.patch}: ${p.applied ? "on" : "off"}`))) : null));
}

function waitingPanel(run) {
  const waits = (run.steps || []).filter((st) => st.status === "waiting");
  if (run.status !== "suspended" || !waits.length) return null;
  return h("section", { class: "panel", "data-testid": "wake-condition", "aria-labelledby": "wait-title" },
    h("h2", { id: "wait-title" }, "Waiting"),
    run.wake_at ? h("p", {}, "Wakes at ", timeEl(run.wake_at), ` (${fmtRelative(run.wake_at)}) unless resolved first.`) : null,
    waits.map((st) => h("div", {},
      h("h3", {}, `#${st.step} ${st.name}`, h("span", { class: "muted" }, " since "), timeEl(st.started_at)),
      st.wake_at ? h("p", {}, st.name === "sleep" ? "Wakes at " : "Times out at ", timeEl(st.wake_at),
        ` (${fmtRelative(st.wake_at)})`) : h("p", { class: "muted" }, "No deadline."),
      st.condition !== null && st.condition !== undefined ? jsonBlock(st.condition, "condition") : null)));
}

function outcomePanel(run) {
  const parts = [h("h2", {}, "Payload and result")];
  const cols = h("div", { class: "cols" },
    h("div", {}, h("h3", {}, "Payload"), jsonBlock(run.payload, "run-payload")),
    h("div", {}, h("h3", {}, run.status === "failed" ? "Error" : "Output"),
      run.status === "completed" ? jsonBlock(run.output, "run-output")
        : run.error && run.status === "failed" ? errorBlock(run.error, "run-error")
          : h("p", { class: "muted" }, LIVE_STATUSES.includes(run.status) ? "Not finished yet." : `The run ended ${run.status}.`)));
  parts.push(cols);
  return h("section", { class: "panel" }, parts);
}

function stepCard(run, st, open, onFork, now) {
  // A step still "running" in a run that ended never finished (cancelled, expired).
  const status = st.status === "running" && !LIVE_STATUSES.includes(run.status) ? "interrupted" : st.status;
  const dur = st.started_at && st.ended_at ? fmtDuration(st.ended_at - st.started_at)
    : st.started_at && status !== "interrupted" ? `${fmtDuration(now - st.started_at)} so far` : "";
  const logs = (run.logs || []).filter((lg) => lg.step === st.step);
  const errors = (run.errors || []).filter((e) => e.step === st.step);
  const body = h("div", { class: "body" },
    h("div", {}, h("h3", {}, "Input"), jsonBlock(st.input ?? null, "step-input")),
    h("div", {}, h("h3", {}, st.status === "failed" ? "Error" : "Output"),
      st.error ? h("p", { class: "error", "data-testid": "step-error" }, st.error)
        : st.status === "completed" || st.status === "resolved" ? jsonBlock(st.output ?? null, "step-output")
          : h("p", { class: "muted" }, { waiting: "Waiting.", running: "Running.", interrupted: "Did not finish." }[status] || "–")),
    st.wake_at || st.condition ? h("div", { class: "wide" }, h("h3", {}, "Wake condition"),
      st.wake_at ? h("p", {}, "Deadline ", timeEl(st.wake_at)) : null,
      st.condition ? jsonBlock(st.condition, "step-condition") : null) : null,
    errors.length ? h("div", { class: "wide" }, h("h3", {}, "Failed attempts"),
      errors.map((e) => h("div", {}, h("p", { class: "muted" }, `attempt ${e.attempt} at `, timeEl(e.time)),
        errorBlock(e, "step-attempt-error")))) : null,
    logs.length ? h("div", { class: "wide" }, h("h3", {}, "Logs"), logsTable(logs)) : null,
    // A checkpoint (done step) is a point to branch from (from the live page, not the past).
    onFork && (st.status === "completed" || st.status === "resolved") ? h("div", { class: "wide actions" },
      h("button", { type: "button", "data-testid": "fork-from-step", onclick: () => onFork(st) }, "Fork from here"),
      st.attempt === 0 ? h("span", { class: "muted" }, "copied from the run this one was forked from") : null) : null);
  return h("details", { class: "step", open, "data-testid": "step", "data-step": st.step, "data-status": status },
    h("summary", {}, h("span", { class: "muted mono" }, `#${st.step}`), h("span", { class: "name" }, st.name),
      statusBadge(status), h("span", { class: "muted" }, `attempt ${st.attempt}`), h("span", { class: "dur" }, dur)),
    body);
}

function attemptsPanel(run) {
  const retries = run.retries || [];
  const bodyErrors = (run.errors || []).filter((e) => e.step === null || e.step === undefined);
  if (!retries.length && !(run.errors || []).length) return null;
  const byAttempt = new Map();
  for (const e of run.errors || []) byAttempt.set(e.attempt, e);
  const rows = retries.map((r) => {
    const failed = byAttempt.get(r.attempt - 1);
    return h("tr", { "data-testid": "retry" },
      h("td", { class: "num" }, r.attempt - 1),
      h("td", {}, failed ? `${failed.type}: ${failed.message}` : "–"),
      h("td", {}, r.reason),
      h("td", { class: "num" }, fmtDuration(r.delay_ms)),
      h("td", { class: "num" }, r.attempt),
      h("td", {}, timeEl(r.retry_at)));
  });
  return h("section", { class: "panel", "aria-labelledby": "attempts-title", "data-testid": "retries" },
    h("h2", { id: "attempts-title" }, "Retries"),
    retries.length ? h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, ["Failed attempt", "Error", "Reason", "Delay", "Next attempt", "At"].map((c) =>
        h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows))) : h("p", { class: "muted" }, "No retries were scheduled."),
    bodyErrors.length ? [h("h3", {}, "Errors raised by the task body"),
      bodyErrors.map((e) => h("div", {}, h("p", { class: "muted" }, `attempt ${e.attempt} at `, timeEl(e.time)),
        errorBlock(e, "attempt-error")))] : null);
}

function childrenPanel(children) {
  if (!children.length) return null;
  return h("section", { class: "panel", "data-testid": "children", "aria-labelledby": "children-title" },
    h("h2", { id: "children-title" }, `Child runs (${children.length})`),
    h("ul", {}, children.map((c) => h("li", {}, runLink(c.run_id), ` ${c.task_id} `, statusBadge(c.status, c.dead_lettered)))));
}

function historyPanel(events) {
  return h("details", { class: "panel", "data-testid": "history" },
    h("summary", {}, `Event history (${events.length} events)`),
    h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, ["Offset", "Time", "Seq", "Type", "Body"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, events.map((ev) => h("tr", {},
        h("td", { class: "num" }, ev.offset), h("td", {}, timeEl(ev.time)), h("td", { class: "num" }, ev.seq),
        h("td", {}, ev.type), h("td", {}, h("code", {}, JSON.stringify(ev.body)))))))));
}

async function loadChildren(runId) {
  try {
    return listOf(await api(`/v1/runs/${encodeURIComponent(runId)}/children`), "runs");
  } catch (err) {
    if (err.status !== 404 && err.status !== 405) throw err;
    // An older server: the runs list filtered by parent says the same.
    return listOf(await api("/v1/runs", { query: { parent: runId, limit: 100 } }), "runs");
  }
}

export async function mountRun(container, route) {
  const runId = route.parts[1];
  const notice = h("div", { role: "status", "aria-live": "polite", "data-testid": "run-notice" });
  const actions = h("div", { class: "actions", "data-testid": "run-actions" });
  const head = h("div");
  const timeline = h("section", { class: "panel", "aria-labelledby": "timeline-heading" });
  const rest = h("div");
  let retryBox = null; // kept across refreshes, so a payload being edited survives them
  let forkBox = null; // likewise the fork form, while open
  const shadowBox = shadowPanel(runId);
  let diffBox = null; // made once the run is known (a fork offers its original), then kept
  const why = whyPanel(runId);
  let asOf = null; // the log offset time travel shows the run at; null: live
  const travel = travelPanel(runId, (offset) => {
    asOf = offset;
    refresh();
  });
  let run = null;
  let events = [];
  container.append(h("p", {}, h("a", { href: "#/runs" }, "← All runs")), notice, head, actions, travel.element, timeline, rest);

  const cancel = h("button", { type: "button", class: "danger", "data-testid": "cancel" }, "Cancel run");
  cancel.addEventListener("click", async () => {
    if (!window.confirm(`Cancel run ${runId}? A running step is stopped at once.`)) return;
    cancel.disabled = true;
    try {
      await api(`/v1/runs/${encodeURIComponent(runId)}/cancel`, { method: "POST", body: {} });
      notice.className = "notice";
      notice.textContent = "Cancel requested.";
    } catch (err) {
      notice.className = "notice bad";
      notice.textContent = `Cancel refused: ${err.message}`;
    }
    cancel.disabled = false;
    refresh();
  });

  const openFork = (st) => {
    forkBox = forkPanel(run, st, () => {
      forkBox.remove();
      forkBox = null;
    });
    rest.prepend(forkBox);
    forkBox.scrollIntoView({ block: "nearest" });
    forkBox.querySelector("button").focus();
  };

  // The events the state was folded from: all of them live, those up to the point in the past.
  const seen = () => (asOf === null ? events : events.filter((ev) => ev.offset <= asOf));

  const drawTimeline = () => {
    clear(timeline, h("h2", { id: "timeline-heading" }, "Timeline"),
      seen().length ? renderTimeline(run, seen(), run.as_of ? run.as_of.time : Date.now())
        : h("p", { class: "muted" }, "No events yet."));
  };

  const render = (children) => {
    const past = run.as_of || null;
    const now = past ? past.time : Date.now();
    clear(head, past ? h("p", { class: "notice past", "data-testid": "as-of-banner", "data-offset": past.offset },
      `Time travel: the run as it stood at offset ${past.offset} (event ${past.events} of ${past.of}, ${past.event}). `,
      "Nothing on this page moves until you go back to live.") : null, header(run, now));
    travel.update(events);
    clear(actions);
    if (!past && LIVE_STATUSES.includes(run.status)) actions.append(cancel);
    const retriable = !past && (run.status === "failed" || run.status === "cancelled");
    if (!retriable) retryBox = null;
    else if (!retryBox) {
      retryBox = h("section", { class: "panel", "data-testid": "retry-panel", "aria-labelledby": "retry-title" },
        h("h2", { id: "retry-title" }, run.dead_lettered ? "Retry this dead letter" : "Retry this run"),
        h("p", { class: "muted" }, "The run resumes after its last completed step. Edit the payload to retry with a new one."),
        retryForm(runId, run.payload, () => refresh()));
    }
    if (!diffBox) diffBox = diffPanel(run);
    drawTimeline();
    const openAll = (run.steps || []).length <= 8;
    const open = new Set([...rest.querySelectorAll("details[data-testid=step][open]")].map((d) => d.dataset.step));
    const hadCards = rest.querySelector("details[data-testid=step]") !== null;
    clear(rest,
      !past && HELD_STATUSES.includes(run.status) ? why.element : null,
      retryBox,
      past ? null : forkBox,
      waitingPanel(run),
      outcomePanel(run),
      h("section", { class: "panel", "aria-labelledby": "steps-title" },
        h("h2", { id: "steps-title" }, `Steps (${(run.steps || []).length})`),
        (run.steps || []).length
          ? run.steps.map((st) => stepCard(run, st, hadCards ? open.has(String(st.step)) : openAll || st.status !== "completed",
            past ? null : openFork, now))
          : h("p", { class: "muted" }, "No steps recorded yet.")),
      attemptsPanel(run),
      past ? null : shadowBox,
      past ? null : diffBox,
      past ? null : childrenPanel(children),
      h("section", { class: "panel", "aria-labelledby": "logs-title" },
        h("h2", { id: "logs-title" }, `Logs (${(run.logs || []).length}${run.logs_dropped ? `, ${run.logs_dropped} dropped` : ""})`),
        logsTable(run.logs || [])),
      historyPanel(seen()),
    );
  };

  let pending = null;
  let loading = null; // the refresh in flight; another is queued behind it, never run beside it
  let again = false;
  const refresh = async () => {
    if (loading) {
      again = true;
      return loading;
    }
    loading = load();
    try {
      await loading;
    } finally {
      loading = null;
    }
    if (again) {
      again = false;
      await refresh();
    }
  };
  const load = async () => {
    try {
      const [state, history, children] = await Promise.all([
        api(`/v1/runs/${encodeURIComponent(runId)}`, { query: { as_of: asOf } }),
        api(`/v1/runs/${encodeURIComponent(runId)}/history`),
        loadChildren(runId),
      ]);
      if (!state.as_of && HELD_STATUSES.includes(state.status)) await why.refresh();
      run = state;
      events = listOf(history, "events");
      render(children);
      container.dataset.runStatus = run.status;
      container.dataset.asOf = run.as_of ? String(run.as_of.offset) : "";
    } catch (err) {
      notice.className = "notice bad";
      notice.textContent = err.status === 404 ? `No run ${runId}.` : `Could not load the run: ${err.message}`;
    }
  };
  // Changes come in bursts (a step's start and end): one refresh per burst.
  const soon = () => {
    if (pending) return;
    pending = setTimeout(() => {
      pending = null;
      refresh();
    }, 150);
  };
  await refresh();
  // Open bars of a live run grow with the clock; what holds a run back changes
  // with its queue (places, holders, the rate limit), which sends no run change.
  let ticks = 0;
  const ticker = setInterval(() => {
    if (run && !run.as_of && LIVE_STATUSES.includes(run.status) && events.length) drawTimeline();
    if (run && !run.as_of && HELD_STATUSES.includes(run.status) && ++ticks % 3 === 0) why.refresh();
  }, 1000);
  return {
    onRun(summary) {
      if (summary.run_id === runId || summary.parent_run_id === runId) soon();
    },
    onResync: soon,
    dispose() {
      clearInterval(ticker);
      if (pending) clearTimeout(pending);
    },
  };
}
