// Two runs side by side (`stepline diff` in the browser): this run against
// another one by id, or a fork against its original. Steps are paired by
// journal position; differing cells are marked and the first divergence
// gets the arrow. Reads GET /v1/runs/{a}/diff/{b}.

import { api } from "./api.js";
import { fmtDuration, h, runLink, statusBadge } from "./util.js";

const RUN_FIELDS = ["task_id", "payload", "task_version", "status", "output", "error"];

function short(value, max = 60) {
  if (value === undefined || value === null) return "–";
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

function side(st, differs, which) {
  if (!st) return [h("td", { class: "missing", colspan: 4 }, h("span", { class: "muted" }, `run ${which} has no step here`))];
  const mark = (field) => (differs.includes(field) ? "differs" : "");
  return [
    h("td", { class: mark("name") }, st.name, " ", statusBadge(st.status)),
    h("td", { class: mark("input") }, h("code", {}, short(st.input))),
    h("td", { class: `${mark("output")} ${mark("error")}`.trim() },
      st.error ? h("span", { class: "error" }, st.error) : h("code", {}, short(st.output))),
    h("td", { class: "num" }, fmtDuration(st.duration_ms)),
  ];
}

function firstText(d) {
  const first = d.first_divergence;
  if (first === null || first === undefined) return "No divergence: the same steps, inputs, outputs and errors.";
  if (typeof first === "number") {
    const pair = d.steps.find((p) => p.step === first);
    return `First divergence: step ${first} (${pair ? pair.differs.join(", ") : "?"}).`;
  }
  return `First divergence: the run's ${first}.`;
}

function diffResult(d) {
  const runRows = RUN_FIELDS.filter((k) => d.run_differs.includes(k)).map((k) => h("tr", { "data-testid": "diff-run-field", "data-field": k },
    h("th", { scope: "row" }, k), h("td", {}, h("code", {}, short(d.a[k], 100))), h("td", {}, h("code", {}, short(d.b[k], 100)))));
  const rows = d.steps.map((p) => {
    const first = p.step === d.first_divergence;
    return h("tr", { "data-testid": "diff-step", "data-step": p.step, "data-differs": p.differs.join(","),
      "data-first": String(first), class: [p.differs.length ? "diverged" : "", first ? "first" : ""].join(" ").trim() },
    h("td", { class: "mark", "aria-label": first ? "first divergence" : p.differs.length ? "differs" : "same" },
      first ? "▶" : p.differs.length ? "≠" : ""),
    h("td", { class: "num" }, p.step),
    side(p.a, p.differs, "A"),
    side(p.b, p.differs, "B"),
    h("td", {}, p.differs.join(", ")));
  });
  const head = (run, which) => h("p", {}, h("strong", {}, `${which} `), runLink(run.run_id), ` ${run.task_id} `, statusBadge(run.status),
    run.task_version ? [" ", h("code", {}, run.task_version)] : null, ` · ${fmtDuration(run.duration_ms)}`);
  return h("div", { "data-testid": "diff-result", "data-same": String(d.same), "data-first": String(d.first_divergence) },
    h("div", { class: "cols" }, head(d.a, "A"), head(d.b, "B")),
    h("p", { class: d.same ? "" : "error", "data-testid": "diff-first" }, firstText(d)),
    runRows.length ? h("div", { class: "table-wrap" }, h("table", { "data-testid": "diff-run" },
      h("thead", {}, h("tr", {}, ["Run", "A", "B"].map((c) => h("th", { scope: "col" }, c)))), h("tbody", {}, runRows))) : null,
    d.steps.length ? h("div", { class: "table-wrap" }, h("table", { class: "diff", "data-testid": "diff-table" },
      h("thead", {},
        h("tr", {}, h("th", { colspan: 2 }, ""), h("th", { colspan: 4, scope: "colgroup" }, "A"),
          h("th", { colspan: 4, scope: "colgroup" }, "B"), h("th", {}, "")),
        h("tr", {}, ["", "#", "Step", "Input", "Output / error", "Time", "Step", "Input", "Output / error", "Time", "Differs"]
          .map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows))) : h("p", { class: "muted" }, "Neither run has steps."));
}

/** "Diff with…" for `run`: another run by id, or (for a fork) its original. */
export function diffPanel(run) {
  const id = `diff-other-${run.run_id}`;
  const other = h("input", { id, type: "text", class: "wide", placeholder: "run id", "data-testid": "diff-other", spellcheck: "false" });
  const button = h("button", { type: "submit", class: "primary", "data-testid": "diff-run" }, "Diff");
  const message = h("p", { class: "error", role: "status", "aria-live": "polite", "data-testid": "diff-message" });
  const out = h("div");
  const show = async (a, b) => {
    message.className = "muted";
    message.textContent = "Comparing…";
    try {
      const d = await api(`/v1/runs/${encodeURIComponent(a)}/diff/${encodeURIComponent(b)}`);
      message.textContent = "";
      out.replaceChildren(diffResult(d));
    } catch (err) {
      message.className = "error";
      message.textContent = `Diff refused: ${err.message}`;
      out.replaceChildren();
    }
  };
  const form = h("form", { class: "filters", "data-testid": "diff-form" },
    h("div", { class: "field" }, h("label", { for: id }, "Diff with run (B)"), other),
    h("div", { class: "field buttons" }, button,
      run.forked_from ? h("button", { type: "button", "data-testid": "diff-original",
        onclick: () => show(run.forked_from, run.run_id) }, "Diff with its original") : null));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const b = other.value.trim();
    if (!b) {
      message.className = "error";
      message.textContent = "Enter the id of the run to compare with.";
      return;
    }
    show(run.run_id, b);
  });
  return h("section", { class: "panel", "data-testid": "diff-panel", "aria-labelledby": `${id}-title` },
    h("h2", { id: `${id}-title` }, "Diff with another run"),
    h("p", { class: "muted" }, "Step by step: names, inputs, outputs, errors and durations side by side, the first divergence ",
      "marked. This run is A; a fork is B against its original."),
    form, message, out);
}
