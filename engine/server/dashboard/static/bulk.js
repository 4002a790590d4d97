// Bulk actions on the runs list: cancel, retry or replay every run the
// current filter selects (all pages, not just the one shown), through
// POST /v1/runs/bulk/{action}. A dry run counts first; confirming sends the
// same filter (its time window pinned by the dry run) and request id, so a
// second click acts on no run twice.

import { api } from "./api.js";
import { h } from "./util.js";

const ACTIONS = [
  ["cancel", "Cancel", "live runs are cancelled"],
  ["retry", "Retry", "failed and cancelled runs resume after their last completed step"],
  ["replay", "Replay", "ended runs run again from scratch, as new runs with the same payload"],
];

function describe(report) {
  const skipped = Object.entries(report.skipped || {}).map(([why, n]) => `${n} ${why}`).join(", ");
  return `${report.matched} run${report.matched === 1 ? "" : "s"} match` +
    (skipped ? `; ${skipped} skipped` : "");
}

/** The list filter in the bulk API's names (the runs list's own query parameters). */
function bulkFilter(filters) {
  const out = {};
  for (const key of ["task", "tag", "q", "parent", "error_type"]) if (filters[key]) out[key] = filters[key];
  if (filters.status) out.status = [filters.status];
  if (filters.from) out.from = Number(filters.from);
  if (filters.to) out.to = Number(filters.to);
  return out;
}

export function bulkBar(filters, onDone) {
  const message = h("p", { class: "muted", role: "status", "aria-live": "polite", "data-testid": "bulk-message" });
  const confirm = h("button", { type: "button", class: "primary", hidden: true, "data-testid": "bulk-confirm" });
  const cancel = h("button", { type: "button", hidden: true, "data-testid": "bulk-abort" }, "Never mind");
  let pending = null; // { action, filter, request_id } of the dry run awaiting confirmation

  const reset = () => {
    pending = null;
    confirm.hidden = true;
    cancel.hidden = true;
    for (const b of buttons) b.disabled = false;
  };

  const preview = async (action, label) => {
    for (const b of buttons) b.disabled = true;
    message.className = "muted";
    message.textContent = "Counting…";
    try {
      const report = await api(`/v1/runs/bulk/${action}`, {
        method: "POST", body: { filter: bulkFilter(filters), dry_run: true },
      });
      message.textContent = `${describe(report)}. ${label} ${report.acted} run${report.acted === 1 ? "" : "s"}?`;
      message.dataset.acted = String(report.acted);
      if (report.acted === 0) {
        reset();
        return;
      }
      pending = { action, filter: report.filter, request_id: report.request_id };
      confirm.textContent = `${label} ${report.acted} run${report.acted === 1 ? "" : "s"}`;
      confirm.hidden = false;
      cancel.hidden = false;
      confirm.focus();
    } catch (err) {
      message.className = "error";
      message.textContent = `Could not count the runs: ${err.message}`;
      reset();
    }
  };

  confirm.addEventListener("click", async () => {
    if (!pending) return;
    const { action, filter, request_id: requestId } = pending;
    confirm.disabled = true;
    try {
      const report = await api(`/v1/runs/bulk/${action}`, {
        method: "POST", body: { filter, request_id: requestId },
      });
      message.className = "muted";
      message.textContent = `Done: ${report.acted} run${report.acted === 1 ? "" : "s"} ` +
        `${action === "cancel" ? "cancelled" : action === "retry" ? "retried" : "replayed"}; ${describe(report)}.`;
      message.dataset.state = "done";
      if (onDone) onDone(report);
    } catch (err) {
      message.className = "error";
      message.textContent = `${action} refused: ${err.message}`;
    }
    confirm.disabled = false;
    reset();
  });
  cancel.addEventListener("click", () => {
    message.textContent = "";
    reset();
  });

  const buttons = ACTIONS.map(([action, label, what]) => {
    const b = h("button", { type: "button", title: `Every run this filter selects: ${what}`,
      "data-testid": `bulk-${action}` }, `${label} all matching…`);
    b.addEventListener("click", () => preview(action, label));
    return b;
  });
  return h("div", { class: "bulk panel", role: "group", "aria-label": "Bulk actions on the runs this filter selects",
    "data-testid": "bulk-bar" },
  h("span", { class: "muted" }, "All pages of this filter:"), ...buttons, confirm, cancel, message);
}
