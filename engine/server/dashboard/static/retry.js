// "Edit payload and retry": a JSON editor checked as you type, and the
// POST /v1/runs/{id}/retry it sends. Used on the run page and in the
// dead-letter list.

import { api } from "./api.js";
import { h, jsonText, parseJson } from "./util.js";

let counter = 0;

/**
 * A form prefilled with `payload`. The payload is sent only when it was
 * changed, so an untouched retry resumes with the original.
 * `onRetried()` after the server accepted the retry.
 */
export function retryForm(runId, payload, onRetried) {
  const id = `retry-payload-${++counter}`;
  const original = jsonText(payload === undefined ? null : payload);
  const textarea = h("textarea", {
    id, rows: Math.min(16, Math.max(4, original.split("\n").length + 1)), spellcheck: "false",
    "aria-describedby": `${id}-msg`, "data-testid": "retry-payload",
  });
  textarea.value = original;
  const message = h("p", { id: `${id}-msg`, class: "error", role: "status", "aria-live": "polite",
    "data-testid": "retry-message" });
  const button = h("button", { type: "submit", class: "primary", "data-testid": "retry-submit" }, "Retry run");
  const reset = h("button", { type: "button", "data-testid": "retry-reset" }, "Reset payload");

  const check = () => {
    const parsed = parseJson(textarea.value);
    textarea.setAttribute("aria-invalid", parsed.ok ? "false" : "true");
    message.className = "error";
    message.textContent = parsed.ok ? "" : parsed.message;
    button.disabled = !parsed.ok;
    return parsed;
  };
  textarea.addEventListener("input", check);
  reset.addEventListener("click", () => {
    textarea.value = original;
    check();
  });

  const form = h("form", { class: "retry-form", "data-testid": "retry-form" },
    h("label", { for: id }, "Payload (JSON)"), textarea, message,
    h("div", { class: "actions" }, button, reset));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const parsed = check();
    if (!parsed.ok) {
      textarea.focus();
      return;
    }
    const changed = JSON.stringify(parsed.value) !== JSON.stringify(JSON.parse(original));
    button.disabled = true;
    message.className = "muted";
    message.textContent = "Retrying…";
    try {
      await api(`/v1/runs/${encodeURIComponent(runId)}/retry`, {
        method: "POST", body: changed ? { payload: parsed.value } : {},
      });
      message.className = "muted";
      message.textContent = changed ? "Retried with the edited payload." : "Retried with the original payload.";
      form.dataset.state = "retried";
      if (onRetried) onRetried();
    } catch (err) {
      message.className = "error";
      message.textContent = `Retry refused: ${err.message}`;
      button.disabled = false;
    }
  });
  return form;
}
