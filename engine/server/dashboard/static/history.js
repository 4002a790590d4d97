// Branching from a run's history: "Fork from here" on a checkpoint, and the
// shadow diff of the run against the server's code (or a module it allows).
// Both only call the API: POST /v1/runs/{id}/fork, GET /v1/runs/{id}/shadow.

import { api } from "./api.js";
import { h, jsonText, parseJson, runLink } from "./util.js";

let counter = 0;

function editor(label, value, testid) {
  const id = `fork-${testid}-${++counter}`;
  const text = jsonText(value === undefined ? null : value);
  const area = h("textarea", {
    id, rows: Math.min(10, Math.max(3, text.split("\n").length + 1)), spellcheck: "false", "data-testid": testid,
  });
  area.value = text;
  return { area, original: text, field: h("div", {}, h("label", { for: id }, label), area) };
}

/**
 * The fork form for checkpoint `step` of `run`: re-run from this step, or
 * keep this step with its (edited) output and run on from the next one.
 * The payload is sent only when changed. `onClose()` hides it.
 */
export function forkPanel(run, step, onClose) {
  const payload = editor("Payload (JSON)", run.payload, "fork-payload");
  const output = editor(`Output of step ${step.step} (JSON)`, step.output, "fork-output");
  const message = h("p", { class: "error", role: "status", "aria-live": "polite", "data-testid": "fork-message" });
  const result = h("div", { "data-testid": "fork-result" });
  const rerun = h("button", { type: "button", class: "primary", "data-testid": "fork-rerun" },
    `Re-run from step ${step.step}`);
  const keep = h("button", { type: "button", "data-testid": "fork-keep" },
    `Keep step ${step.step}'s output, run on from step ${step.step + 1}`);
  const close = h("button", { type: "button", class: "link", "data-testid": "fork-close" }, "Close");

  const parsed = (ed) => {
    const p = parseJson(ed.area.value);
    ed.area.setAttribute("aria-invalid", p.ok ? "false" : "true");
    return p;
  };
  const check = () => {
    const bad = [payload, output].map(parsed).find((p) => !p.ok);
    message.className = "error";
    message.textContent = bad ? bad.message : "";
    rerun.disabled = keep.disabled = Boolean(bad);
    return !bad;
  };
  payload.area.addEventListener("input", check);
  output.area.addEventListener("input", check);

  const submit = async (keepOutput) => {
    if (!check()) return;
    const body = { at_step: keepOutput ? step.step + 1 : step.step };
    const p = parsed(payload);
    if (JSON.stringify(p.value) !== JSON.stringify(JSON.parse(payload.original))) body.payload = p.value;
    if (keepOutput) {
      const o = parsed(output);
      if (JSON.stringify(o.value) !== JSON.stringify(JSON.parse(output.original))) {
        body.step_outputs = { [String(step.step)]: o.value };
      }
    }
    rerun.disabled = keep.disabled = true;
    message.className = "muted";
    message.textContent = "Forking…";
    try {
      const answer = await api(`/v1/runs/${encodeURIComponent(run.run_id)}/fork`, { method: "POST", body });
      message.textContent = "";
      result.replaceChildren(h("p", { class: "notice" }, "Forked: ", runLink(answer.run_id),
        ` (steps before ${answer.at_step} copied, the rest runs live)`));
      result.dataset.runId = answer.run_id;
    } catch (err) {
      message.className = "error";
      message.textContent = `Fork refused: ${err.message}`;
    }
    rerun.disabled = keep.disabled = false;
  };
  rerun.addEventListener("click", () => submit(false));
  keep.addEventListener("click", () => submit(true));
  close.addEventListener("click", () => onClose());

  return h("section", { class: "panel", "data-testid": "fork-panel", "data-step": step.step, "aria-labelledby": "fork-title" },
    h("h2", { id: "fork-title" }, `Fork from step ${step.step} (${step.name})`),
    h("p", { class: "muted" }, "A new run of this task: the steps before the fork point answer from this run's journal ",
      "(nothing runs again), the rest runs live. Edit the payload or this step's output to try another history."),
    h("div", { class: "cols" }, payload.field, output.field),
    message,
    h("div", { class: "actions" }, rerun, keep, close),
    result);
}

const VERDICT_TEXT = {
  "same": "same",
  "input-changed": "input changed",
  "name-changed": "other step",
  "new-step": "new step (not run)",
  "missing-step": "not reached",
  "open": "history ends here",
  "beyond-history": "beyond the history",
  "unrecorded": "token (unrecorded)",
};
const DIVERGING = new Set(["input-changed", "name-changed", "new-step", "missing-step"]);

function short(value) {
  if (value === undefined || value === null) return "–";
  const text = JSON.stringify(value);
  return text.length > 80 ? `${text.slice(0, 79)}…` : text;
}

function shadowResult(res) {
  const rows = res.steps.map((st) => h("tr", { "data-testid": "shadow-step", "data-step": st.step, "data-verdict": st.verdict,
    class: DIVERGING.has(st.verdict) ? "diverged" : "" },
  h("td", { class: "num" }, st.step),
  h("td", {}, st.recorded_name || "–"),
  h("td", {}, st.shadow_name || "–"),
  h("td", {}, h("span", { class: `badge ${DIVERGING.has(st.verdict) ? "failed" : "completed"}` }, VERDICT_TEXT[st.verdict] || st.verdict)),
  h("td", {}, h("code", {}, short(st.recorded_input))),
  h("td", {}, h("code", {}, st.verdict === "input-changed" ? short(st.shadow_input) : "")),
  h("td", {}, h("code", {}, short(st.output)))));
  const v = res.versions;
  const first = res.first_divergence;
  return h("div", { "data-testid": "shadow-result", "data-diverged": String(res.diverged) },
    h("p", {},
      h("span", { class: `badge ${res.diverged ? "failed" : "completed"}`, "data-testid": "shadow-verdict" },
        res.diverged ? "diverges" : "replays the same"),
      ` against ${res.code}`),
    h("p", { "data-testid": "shadow-versions" }, "Task version: ", h("code", {}, v.recorded || "–"), " → ",
      h("code", {}, v.shadow || "–"), v.changed ? " (changed)" : " (unchanged)"),
    first ? h("p", { class: "error", "data-testid": "shadow-first" }, `First divergence: ${first.message}`) : null,
    h("div", { class: "table-wrap" }, h("table", { "data-testid": "shadow-table" },
      h("thead", {}, h("tr", {}, ["#", "Recorded step", "New code's step", "Verdict", "Recorded input", "New input", "Output served"]
        .map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows))),
    res.output && (res.output.recorded !== null || res.output.shadow !== null)
      ? h("p", { "data-testid": "shadow-output" }, "Run output: ", h("code", {}, short(res.output.recorded)), " → ",
        h("code", {}, short(res.output.shadow))) : null);
}

/** The shadow diff of `runId`: against the server's app, or a module the server allows. */
export function shadowPanel(runId) {
  const id = `shadow-module-${++counter}`;
  const module = h("input", { id, type: "text", class: "wide", placeholder: "the server's app", "data-testid": "shadow-module",
    spellcheck: "false", "aria-describedby": `${id}-help` });
  const button = h("button", { type: "submit", class: "primary", "data-testid": "shadow-run" }, "Shadow this run");
  const message = h("p", { class: "error", role: "status", "aria-live": "polite", "data-testid": "shadow-message" });
  const out = h("div");
  const form = h("form", { class: "filters", "data-testid": "shadow-form" },
    h("div", { class: "field" }, h("label", { for: id }, "New code (module)"), module),
    h("div", { class: "field buttons" }, button));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    button.disabled = true;
    message.className = "muted";
    message.textContent = "Replaying against the new code…";
    try {
      const res = await api(`/v1/runs/${encodeURIComponent(runId)}/shadow`, { query: { module: module.value.trim() } });
      message.textContent = "";
      out.replaceChildren(shadowResult(res));
    } catch (err) {
      message.className = "error";
      message.textContent = `Shadow refused: ${err.message}`;
      out.replaceChildren();
    }
    button.disabled = false;
  });
  return h("section", { class: "panel", "data-testid": "shadow-panel", "aria-labelledby": "shadow-title" },
    h("h2", { id: "shadow-title" }, "Shadow against new code"),
    h("p", { class: "muted", id: `${id}-help` }, "Re-executes this run with every step answered from its journal ",
      "(no step runs, nothing is recorded) and compares step names, inputs and the output. Leave the module empty ",
      "for the server's own code; other modules need a server started with --shadow-path and a token."),
    form, message, out);
}
