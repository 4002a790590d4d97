// The runs list and the dead letters: one page of runs at a time from
// GET /v1/runs (filters and a cursor, never everything), kept current by
// the live stream without reloading.

import { api } from "./api.js";
import { bulkBar } from "./bulk.js";
import { retryForm } from "./retry.js";
import {
  clear, fmtDuration, h, listOf, localInputToMs, msToLocalInput, runLink, statusBadge, STATUSES, timeEl,
} from "./util.js";

const PAGE_SIZES = [25, 50, 100];
const FILTERS = ["task", "status", "tag", "from", "to", "q", "parent", "error_type"];

/** Whether a run summary passes the filters (all but `q`, which needs the payload). */
function matches(run, filters) {
  if (filters.task && run.task_id !== filters.task) return false;
  if (filters.status && run.status !== filters.status) return false;
  if (filters.tag && !(run.tags || []).includes(filters.tag)) return false;
  if (filters.parent && run.parent_run_id !== filters.parent) return false;
  if (filters.error_type && run.error_type !== filters.error_type) return false;
  if (filters.dead_letter && !run.dead_lettered) return false;
  if (filters.from && run.created_at < Number(filters.from)) return false;
  if (filters.to && run.created_at > Number(filters.to)) return false;
  return true;
}

function duration(run) {
  if (run.started_at === null || run.started_at === undefined) return "–";
  return fmtDuration((run.ended_at ?? Date.now()) - run.started_at);
}

function errorText(run) {
  if (!run.error_type && !run.error_message) return "";
  return `${run.error_type || "Error"}: ${run.error_message || ""}`;
}

/**
 * A table of runs that pages with the API's cursor and follows the stream.
 * `options.deadLetters` adds the retry action and fixes dead_letter=true.
 */
class RunTable {
  constructor(container, filters, options = {}) {
    this.container = container;
    this.filters = filters;
    this.deadLetters = Boolean(options.deadLetters);
    this.limit = Number(filters.limit) || 50;
    this.cursors = []; // cursors of the pages before this one; [] = the newest page
    this.cursor = null;
    this.nextCursor = null;
    this.trimmed = false; // rows were dropped off the bottom by live inserts
    this.rows = new Map(); // run id -> <tr>
    this.unseen = 0;
    this.tbody = h("tbody", { "data-testid": "runs-body" });
    this.status = h("p", { class: "muted", role: "status", "aria-live": "polite", "data-testid": "runs-status" });
    this.newer = h("button", { type: "button", "data-testid": "page-newer" }, "← Newer");
    this.older = h("button", { type: "button", "data-testid": "page-older" }, "Older →");
    this.unseenButton = h("button", { type: "button", class: "link", hidden: true, "data-testid": "show-new" });
    this.newer.addEventListener("click", () => this.load(this.cursors.pop() ?? null));
    this.older.addEventListener("click", () => this.loadOlder());
    this.unseenButton.addEventListener("click", () => {
      this.cursors = [];
      this.load(null);
    });
    const head = ["Run", "Task", "Status", "Attempt", "Created", "Duration", "Tags", "Error"];
    if (this.deadLetters) head.push(h("span", { class: "sr-only" }, "Actions"));
    container.append(
      h("div", { class: "table-wrap" },
        h("table", { class: "runs", "data-testid": this.deadLetters ? "dead-letters-table" : "runs-table" },
          h("caption", { class: "sr-only" }, this.deadLetters ? "Dead-lettered runs" : "Runs, newest first"),
          h("thead", {}, h("tr", {}, head.map((c) => h("th", { scope: "col" }, c)))),
          this.tbody)),
      h("div", { class: "pager" }, this.newer, this.older, this.unseenButton, this.status),
    );
  }

  query(cursor) {
    const q = { limit: this.limit };
    for (const key of FILTERS) if (this.filters[key]) q[key] = this.filters[key];
    if (this.deadLetters) q.dead_letter = "true";
    if (cursor) q.cursor = cursor;
    return q;
  }

  async load(cursor) {
    this.status.textContent = "Loading…";
    let answer;
    try {
      answer = await api("/v1/runs", { query: this.query(cursor) });
    } catch (err) {
      this.status.textContent = "";
      clear(this.tbody, h("tr", {}, h("td", { colspan: 9, class: "notice bad", role: "alert" },
        `Could not load runs: ${err.message}`)));
      return;
    }
    this.cursor = cursor;
    this.nextCursor = answer.next_cursor || null;
    this.trimmed = false;
    this.unseen = 0;
    this.unseenButton.hidden = true;
    this.rows.clear();
    clear(this.tbody);
    const runs = listOf(answer, "runs");
    for (const run of runs) this.tbody.append(this.row(run));
    if (!runs.length) {
      this.tbody.append(h("tr", { "data-testid": "runs-empty" }, h("td", { colspan: 9, class: "empty" },
        this.deadLetters ? "No dead letters. Runs that exhaust their retries show up here." : "No runs match.")));
    }
    this.newer.disabled = this.cursor === null;
    this.older.disabled = !this.nextCursor;
    this.count();
  }

  count() {
    const shown = this.rows.size;
    this.status.textContent = `Page ${this.cursors.length + 1} · ${shown} run${shown === 1 ? "" : "s"}`;
  }

  async loadOlder() {
    let next = this.nextCursor;
    if (this.trimmed) {
      // Live inserts pushed rows off this page: the cursor the server gave
      // for it would skip them. Ask again for where this page ends now.
      try {
        next = (await api("/v1/runs", { query: this.query(this.cursor) })).next_cursor || null;
      } catch (err) {
        this.status.textContent = `Could not load runs: ${err.message}`;
        return;
      }
    }
    this.cursors.push(this.cursor);
    await this.load(next);
  }

  row(run, fresh = false) {
    const cells = [
      h("td", {}, runLink(run.run_id)),
      h("td", {}, run.task_id),
      h("td", {}, statusBadge(run.status, run.dead_lettered),
        run.paused ? h("span", { class: "tag", title: "its task or queue is paused", "data-testid": "paused" },
          "paused") : null),
      h("td", { class: "num" }, run.attempt ?? "–"),
      h("td", {}, timeEl(run.created_at)),
      h("td", { class: "num" }, duration(run)),
      h("td", { class: "tags" }, (run.tags || []).map((t) => h("span", { class: "tag" }, t))),
      h("td", { class: "error-cell" }, h("div", { class: "clip", title: errorText(run) }, errorText(run))),
    ];
    if (this.deadLetters) {
      const open = h("button", { type: "button", "aria-expanded": "false", "data-testid": "edit-retry" },
        "Edit payload and retry");
      open.addEventListener("click", () => this.toggleEditor(run.run_id, open));
      const canRetry = run.status === "failed" || run.status === "cancelled";
      open.disabled = !canRetry;
      cells.push(h("td", { class: "action" }, open));
    }
    const tr = h("tr", {
      class: fresh ? "fresh" : null, "data-testid": "run-row", "data-run-id": run.run_id, "data-status": run.status,
      "data-created": run.created_at,
    }, cells);
    const old = this.rows.get(run.run_id);
    this.rows.set(run.run_id, tr);
    if (old) {
      const editor = old.nextElementSibling;
      old.replaceWith(tr);
      // An open editor stays open (and its button says so) while the row changes.
      if (editor && editor.dataset.editorFor === run.run_id) {
        const button = tr.querySelector("[data-testid=edit-retry]");
        if (button) button.setAttribute("aria-expanded", "true");
      }
    }
    return tr;
  }

  async toggleEditor(runId, button) {
    const tr = this.rows.get(runId);
    const next = tr.nextElementSibling;
    if (next && next.dataset.editorFor === runId) {
      next.remove();
      button.setAttribute("aria-expanded", "false");
      return;
    }
    button.setAttribute("aria-expanded", "true");
    const cell = h("td", { colspan: 9 }, h("p", { class: "muted" }, "Loading the payload…"));
    const editorRow = h("tr", { "data-testid": "retry-editor", dataset: { editorFor: runId } }, cell);
    tr.after(editorRow);
    try {
      const run = await api(`/v1/runs/${encodeURIComponent(runId)}`);
      clear(cell,
        run.error ? h("p", { class: "error" }, `${run.error.type}: ${run.error.message}`) : null,
        retryForm(runId, run.payload),
      );
      cell.querySelector("textarea").focus();
    } catch (err) {
      clear(cell, h("p", { class: "notice bad", role: "alert" }, `Could not load the run: ${err.message}`));
    }
  }

  /** A change from the stream: update the row, or add the run if it belongs on this page. */
  onRun(run) {
    if (this.rows.has(run.run_id)) {
      this.row(run, true);
      return;
    }
    if (!matches(run, { ...this.filters, dead_letter: this.deadLetters })) return;
    // Only the newest page takes new runs, and only when the server could say
    // whether they match: a payload search cannot be checked here.
    if (this.cursor !== null || this.filters.q) {
      this.unseen += 1;
      this.unseenButton.textContent = `${this.unseen} new or changed run${this.unseen === 1 ? "" : "s"}: show newest`;
      this.unseenButton.hidden = false;
      return;
    }
    const empty = this.tbody.querySelector("[data-testid=runs-empty]");
    if (empty) empty.remove();
    // The server's order, newest first: by creation time, then run id.
    const older = [...this.tbody.querySelectorAll("tr[data-testid=run-row]")].find((other) => {
      const created = Number(other.dataset.created);
      return created < run.created_at || (created === run.created_at && other.dataset.runId < run.run_id);
    });
    const tr = this.row(run, true);
    if (older) older.before(tr);
    else this.tbody.append(tr);
    // The page keeps its size: a busy system must not grow it without end.
    while (this.rows.size > this.limit) {
      const last = [...this.tbody.querySelectorAll("tr[data-testid=run-row]")].pop();
      const editor = last.nextElementSibling;
      if (editor && editor.dataset.editorFor === last.dataset.runId) break; // never drop an open editor
      this.rows.delete(last.dataset.runId);
      last.remove();
      this.trimmed = true;
      this.older.disabled = false;
    }
    this.count();
  }
}

function filterForm(filters, onApply) {
  const field = (name, label, input) => {
    input.id = `filter-${name}`;
    input.name = name;
    input.dataset.testid = `filter-${name}`;
    return h("div", { class: "field" }, h("label", { for: input.id }, label), input);
  };
  const text = (value, placeholder) => h("input", { type: "search", value: value || "", placeholder: placeholder || "" });
  const status = h("select", {},
    h("option", { value: "" }, "any"),
    STATUSES.map((st) => h("option", { value: st, selected: filters.status === st }, st)));
  const from = h("input", { type: "datetime-local", value: msToLocalInput(filters.from) });
  const to = h("input", { type: "datetime-local", value: msToLocalInput(filters.to) });
  const size = Number(filters.limit) || 50;
  const sizes = PAGE_SIZES.includes(size) ? PAGE_SIZES : [...PAGE_SIZES, size].sort((a, b) => a - b);
  const limit = h("select", {}, sizes.map((n) => h("option", { value: n, selected: size === n }, n)));
  const form = h("form", { class: "filters panel", role: "search", "aria-label": "Filter runs", "data-testid": "filters" },
    field("task", "Task", text(filters.task, "task id")),
    field("status", "Status", status),
    field("tag", "Tag", text(filters.tag)),
    field("from", "Created from", from),
    field("to", "Created to", to),
    field("q", "Text in payload or output", text(filters.q, "e.g. order-42")),
    field("error_type", "Error type", text(filters.error_type, "e.g. TimeoutError")),
    field("limit", "Per page", limit),
    h("div", { class: "field buttons" },
      h("button", { type: "submit", class: "primary", "data-testid": "filter-apply" }, "Apply"),
      h("button", { type: "reset", "data-testid": "filter-reset" }, "Clear")),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const data = new FormData(form);
    onApply({
      task: data.get("task").trim(), status: data.get("status"), tag: data.get("tag").trim(),
      from: localInputToMs(data.get("from")), to: localInputToMs(data.get("to")),
      q: data.get("q").trim(), limit: data.get("limit"), parent: filters.parent || "",
      error_type: data.get("error_type").trim(),
    });
  });
  form.addEventListener("reset", (ev) => {
    ev.preventDefault();
    onApply({});
  });
  return form;
}

function filtersFromQuery(query) {
  const filters = {};
  for (const key of [...FILTERS, "limit"]) if (query.get(key)) filters[key] = query.get(key);
  return filters;
}

function setQuery(base, filters) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(filters)) if (value) params.set(key, value);
  const qs = params.toString();
  location.hash = qs ? `${base}?${qs}` : base;
}

export async function mountRuns(container, route) {
  const filters = filtersFromQuery(route.query);
  container.append(
    h("div", { class: "page-head" }, h("h1", {}, "Runs"),
      filters.parent ? h("span", { class: "muted" }, "children of ", runLink(filters.parent)) : null),
    filterForm(filters, (next) => setQuery("#/runs", next)),
  );
  let table = null;
  container.append(bulkBar(filters, () => table.load(table.cursor)));
  table = new RunTable(container, filters);
  await table.load(null);
  return { onRun: (run) => table.onRun(run), onResync: () => table.load(table.cursor) };
}

export async function mountDeadLetters(container, route) {
  const filters = filtersFromQuery(route.query);
  container.append(
    h("div", { class: "page-head" }, h("h1", {}, "Dead letters"),
      h("span", { class: "muted" }, "Runs that failed for good. Retrying resumes after the last completed step.")),
  );
  const table = new RunTable(container, filters, { deadLetters: true });
  await table.load(null);
  return { onRun: (run) => table.onRun(run), onResync: () => table.load(table.cursor) };
}
