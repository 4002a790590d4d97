// Time travel: the run page as of a past point of the run's history (the
// CLI's `runs show --as-of` in the browser), and the events between two
// points. A point is a log offset: the slider walks the run's events one by
// one, the checkpoint list jumps to a completed step, a resumed wait or the
// end. The page asks GET /v1/runs/{id}?as_of=OFFSET for the state then and
// GET /v1/runs/{id}/history?from=&to= for what happened in between.

import { api } from "./api.js";
import { h, listOf, timeEl } from "./util.js";

const ENDINGS = new Set(["RunCompleted", "RunFailed", "RunCancelled", "RunExpired", "RunDeadLettered"]);

/** The points worth naming in `events`: the start, each checkpoint, each ending. */
export function checkpoints(events) {
  const out = [];
  events.forEach((ev, i) => {
    const body = ev.body || {};
    if (i === 0) out.push({ offset: ev.offset, label: `start (${ev.type})` });
    else if (ev.type === "StepCompleted") out.push({ offset: ev.offset, label: `after step ${body.step} (${body.name})` });
    else if (ev.type === "RunResumed") out.push({ offset: ev.offset, label: `step ${body.step} resumed (${body.reason})` });
    else if (ENDINGS.has(ev.type)) out.push({ offset: ev.offset, label: `end: ${ev.type}` });
  });
  return out;
}

function eventsTable(events) {
  if (!events.length) return h("p", { class: "muted", "data-testid": "travel-no-events" }, "No events between these points.");
  return h("div", { class: "table-wrap" }, h("table", { "data-testid": "travel-events" },
    h("thead", {}, h("tr", {}, ["Offset", "Time", "Type", "Body"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, events.map((ev) => h("tr", { "data-testid": "travel-event", "data-offset": ev.offset, "data-type": ev.type },
      h("td", { class: "num" }, ev.offset), h("td", {}, timeEl(ev.time)), h("td", {}, ev.type),
      h("td", {}, h("code", {}, JSON.stringify(ev.body))))))));
}

let counter = 0;

/**
 * The time-travel control of run `runId`. `onPoint(offset | null)` asks the
 * page to show the run as of `offset` (null: live). `update(events, asOf)`
 * redraws it for the run's events and the point shown.
 */
export function travelPanel(runId, onPoint) {
  const id = `travel-${++counter}`;
  const slider = h("input", { id: `${id}-slider`, type: "range", min: 0, max: 0, step: 1, value: 0, class: "travel-slider",
    "data-testid": "travel-slider", "aria-describedby": `${id}-at` });
  const picker = h("select", { id: `${id}-checkpoint`, "data-testid": "travel-checkpoint" });
  const from = h("select", { id: `${id}-from`, "data-testid": "travel-from" });
  const live = h("button", { type: "button", "data-testid": "travel-live" }, "Back to live");
  const at = h("p", { id: `${id}-at`, "data-testid": "travel-at" });
  const between = h("div", { "data-testid": "travel-between" });
  let events = [];
  let asOf = null;
  let fromOffset = null; // null: the start of the run's history

  const indexOf = (offset) => {
    const i = events.findIndex((ev) => ev.offset > offset);
    return i === -1 ? events.length - 1 : Math.max(0, i - 1);
  };

  const drawBetween = async () => {
    if (asOf === null) {
      between.replaceChildren();
      return;
    }
    const query = { to: asOf };
    if (fromOffset !== null) query.from = fromOffset;
    try {
      const answer = await api(`/v1/runs/${encodeURIComponent(runId)}/history`, { query });
      between.replaceChildren(h("h3", {}, fromOffset === null ? `Events up to offset ${asOf}`
        : `Events after offset ${fromOffset}, up to offset ${asOf}`), eventsTable(listOf(answer, "events")));
    } catch (err) {
      between.replaceChildren(h("p", { class: "error" }, `Could not read the events: ${err.message}`));
    }
  };

  const options = (select, points, selected, first) => {
    select.replaceChildren(first, ...points.map((p) => h("option", { value: p.offset, selected: p.offset === selected },
      `${p.label} · offset ${p.offset}`)));
  };

  const draw = () => {
    const points = checkpoints(events);
    slider.max = Math.max(0, events.length - 1);
    slider.value = asOf === null ? slider.max : indexOf(asOf);
    options(picker, points, asOf, h("option", { value: "", selected: asOf === null }, "live (now)"));
    // A point among the options, else the nearest checkpoint before it.
    const selectable = points.some((p) => p.offset === asOf);
    if (asOf !== null && !selectable) picker.prepend(h("option", { value: asOf, selected: true }, `offset ${asOf}`));
    options(from, points.filter((p) => asOf === null || p.offset < asOf), fromOffset,
      h("option", { value: "", selected: fromOffset === null }, "the start"));
    live.disabled = asOf === null;
    const ev = asOf === null ? null : events[indexOf(asOf)];
    at.replaceChildren(...(ev
      ? ["Showing the run as of offset ", h("strong", {}, String(ev.offset)), ` (event ${indexOf(asOf) + 1} of ${events.length}, `,
        ev.type, ", ", timeEl(ev.time), ")."]
      : [`Showing the run live (${events.length} event${events.length === 1 ? "" : "s"}). `,
        "Pick a point to see it as it was then."]));
  };

  const go = (offset) => {
    asOf = offset;
    // The events between: from the checkpoint before the point, unless one was chosen.
    if (asOf === null || (fromOffset !== null && fromOffset >= asOf)) fromOffset = null;
    if (asOf !== null && fromOffset === null) {
      const before = checkpoints(events).filter((p) => p.offset < asOf);
      fromOffset = before.length ? before[before.length - 1].offset : null;
    }
    draw();
    onPoint(asOf);
    drawBetween();
  };

  slider.addEventListener("change", () => go(events[Number(slider.value)].offset));
  slider.addEventListener("input", () => {
    const ev = events[Number(slider.value)];
    if (ev) at.textContent = `Release to show the run as of offset ${ev.offset} (${ev.type}).`;
  });
  picker.addEventListener("change", () => go(picker.value === "" ? null : Number(picker.value)));
  from.addEventListener("change", () => {
    fromOffset = from.value === "" ? null : Number(from.value);
    drawBetween();
  });
  live.addEventListener("click", () => go(null));

  const element = h("section", { class: "panel travel", "data-testid": "travel-panel", "aria-labelledby": `${id}-title` },
    h("h2", { id: `${id}-title` }, "Time travel"),
    h("div", { class: "filters" },
      h("div", { class: "field grow" }, h("label", { for: slider.id }, "As of event"), slider),
      h("div", { class: "field" }, h("label", { for: picker.id }, "Checkpoint"), picker),
      h("div", { class: "field" }, h("label", { for: from.id }, "Events since"), from),
      h("div", { class: "field buttons" }, live)),
    at, between);
  return {
    element,
    update(newEvents) {
      events = newEvents;
      draw();
    },
  };
}
