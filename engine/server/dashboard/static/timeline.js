// A run's timeline, drawn as SVG from its event history: one lane for the
// attempts (with the retry delays between them as dashed gaps) and one lane
// per journal position (a step's bar per attempt that ran it; a sleep or
// wait as a hatched bar until it resumed).

import { fmtDuration, fmtTime, h, s } from "./util.js";

function preview(value) {
  if (value === undefined || value === null) return "";
  const text = JSON.stringify(value);
  return text.length > 120 ? `${text.slice(0, 117)}…` : text;
}

/** Lanes of segments and markers, from the events of one run in log order. */
export function buildTimeline(run, events, now) {
  const attempts = { key: "attempts", label: "Attempts", sub: "", segments: [], markers: [] };
  const steps = new Map(); // journal position -> lane
  const openSteps = new Map(); // "step:attempt" -> segment
  const openWaits = new Map(); // step -> segment
  const resolved = new Map(); // step -> what resolved it, for resolutions that came before the wait
  let attempt = null;
  let delay = null;

  const lane = (step, name) => {
    let l = steps.get(step);
    if (!l) {
      l = { key: `step-${step}`, step, label: name || "?", sub: `#${step}`, segments: [], markers: [] };
      steps.set(step, l);
    } else if (name && l.label === "?") {
      l.label = name;
    }
    return l;
  };
  const endAttempt = (t, status) => {
    if (!attempt) return;
    attempt.end = t;
    attempt.status = status;
    for (const [key, seg] of openSteps) {
      if (seg.attempt === attempt.attempt) {
        seg.end = t;
        seg.status = status === "cancelled" ? "cancelled" : "interrupted";
        seg.note = "the attempt ended before this step finished";
        openSteps.delete(key);
      }
    }
    attempt = null;
  };

  for (const ev of events) {
    const b = ev.body || {};
    const t = ev.time;
    if (attempt) attempt.last = t;
    switch (ev.type) {
      case "RunTriggered":
        attempts.markers.push({ t, label: "triggered", kind: "start" });
        break;
      case "RunStarted":
        if (attempt) endAttempt(attempt.last, "interrupted"); // its worker died mid-attempt
        // Running again means every wait was answered, whether we saw how or not.
        for (const seg of openWaits.values()) {
          seg.end = t;
          seg.status = "completed";
        }
        openWaits.clear();
        if (delay) {
          delay.end = t;
          delay = null;
        }
        attempt = { start: t, last: t, attempt: b.attempt, status: "running", label: `attempt ${b.attempt}`,
          note: b.worker_id ? `worker ${b.worker_id}` : "" };
        attempts.segments.push(attempt);
        break;
      case "StepStarted": {
        const seg = { start: t, attempt: b.attempt, step: b.step, status: "running", label: b.name };
        lane(b.step, b.name).segments.push(seg);
        openSteps.set(`${b.step}:${b.attempt}`, seg);
        break;
      }
      case "StepCompleted":
      case "StepFailed": {
        if (b.step === null || b.step === undefined) break; // the task body raised: the attempt's outcome
        const key = `${b.step}:${b.attempt}`;
        const seg = openSteps.get(key);
        if (!seg) break;
        seg.end = t;
        seg.status = ev.type === "StepCompleted" ? "completed" : "failed";
        if (ev.type === "StepCompleted") seg.note = `output ${preview(b.output)}`;
        else if (b.error) seg.note = `${b.error.type}: ${b.error.message}`;
        openSteps.delete(key);
        break;
      }
      case "RunSuspended": {
        const seg = { start: t, step: b.step, status: "waiting", kind: "wait", label: b.reason,
          note: b.wake_at ? `until ${fmtTime(b.wake_at)}` : "no deadline", wakeAt: b.wake_at };
        if (b.condition) seg.note += ` · ${b.condition}`;
        lane(b.step, b.reason).segments.push(seg);
        if (resolved.has(b.step)) {
          // Answered before the wait was recorded (a fast child, a quick token).
          seg.end = t;
          seg.status = "completed";
          seg.note = `resolved before the wait was recorded, by ${resolved.get(b.step)}`;
        } else {
          openWaits.set(b.step, seg);
        }
        endAttempt(t, "suspended");
        break;
      }
      case "RunResumed":
      case "WaitCompleted": {
        const seg = openWaits.get(b.step);
        if (!seg) {
          if (ev.type === "WaitCompleted") resolved.set(b.step, `${b.reason} ${b.source || ""}`.trim());
          break;
        }
        seg.end = t;
        seg.status = "completed";
        seg.note = ev.type === "RunResumed" ? `resumed: ${b.reason}` : `resolved by ${b.reason} ${b.source || ""}`;
        openWaits.delete(b.step);
        break;
      }
      case "RetryScheduled":
        endAttempt(t, "failed");
        delay = { start: t, end: b.retry_at, kind: "delay", status: "delay",
          label: `retry in ${fmtDuration(b.delay_ms)}`, note: b.reason };
        attempts.segments.push(delay);
        break;
      case "RunCompleted":
      case "RunFailed":
        endAttempt(t, ev.type === "RunCompleted" ? "completed" : "failed");
        attempts.markers.push({ t, label: ev.type === "RunCompleted" ? "completed" : "failed", kind: "end" });
        break;
      case "RunCancelled":
        endAttempt(t, "cancelled");
        for (const seg of openWaits.values()) {
          seg.end = t;
          seg.status = "cancelled";
        }
        openWaits.clear();
        if (delay) delay.end = t;
        delay = null;
        attempts.markers.push({ t, label: "cancelled", kind: "end" });
        break;
      case "RunRetriggered":
        attempts.markers.push({ t, label: b.payload ? "retried, new payload" : "retried", kind: "retry" });
        break;
      case "RunExpired":
        attempts.markers.push({ t, label: "expired", kind: "end" });
        break;
      default:
        break;
    }
  }
  // Whatever is still open runs to now (a live run) or to the last event.
  const first = events.length ? events[0].time : run.created_at;
  const last = events.length ? events[events.length - 1].time : first;
  const live = ["pending", "running", "suspended", "retrying"].includes(run.status);
  const end = live ? Math.max(now, last) : last;
  for (const l of [attempts, ...steps.values()]) {
    for (const seg of l.segments) {
      if (seg.end === undefined || seg.end === null) {
        seg.end = end;
        seg.open = true;
      }
    }
  }
  const lanes = [attempts, ...[...steps.values()].sort((a, b) => a.step - b.step)];
  let t1 = end;
  for (const l of lanes) for (const seg of l.segments) t1 = Math.max(t1, seg.end);
  return { lanes, t0: first, t1: Math.max(t1, first + 1), live };
}

const W = 1000;
const LABEL_W = 190;
const RIGHT = 80;
const ROW = 30;
const AXIS = 26;

function ticks(t0, t1) {
  const span = t1 - t0;
  const steps = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 15_000, 30_000, 60_000,
    120_000, 300_000, 600_000, 1_800_000, 3_600_000, 7_200_000, 21_600_000, 43_200_000, 86_400_000];
  const step = steps.find((st) => span / st <= 6) || span / 6;
  const out = [];
  for (let v = 0; v <= span; v += step) out.push(v);
  return out;
}

/** The timeline as an SVG in a scrollable box, with a legend. */
export function renderTimeline(run, events, now = Date.now()) {
  const { lanes, t0, t1 } = buildTimeline(run, events, now);
  const plot = W - LABEL_W - RIGHT;
  const x = (t) => LABEL_W + ((t - t0) / (t1 - t0)) * plot;
  const height = AXIS + lanes.length * ROW + 6;
  const svg = s("svg", {
    viewBox: `0 0 ${W} ${height}`, role: "img", "aria-labelledby": "timeline-title", "data-testid": "timeline",
    preserveAspectRatio: "xMinYMin meet",
  });
  svg.append(
    s("title", { id: "timeline-title" },
      `Timeline of run ${run.run_id}: ${lanes.length - 1} journal position(s), ${fmtDuration(t1 - t0)}`),
    s("defs", {}, s("pattern", { id: "hatch", width: 6, height: 6, patternUnits: "userSpaceOnUse",
      patternTransform: "rotate(45)" },
    s("rect", { width: 6, height: 6, fill: "#fff4d6" }),
    s("line", { x1: 0, y1: 0, x2: 0, y2: 6, stroke: "#e0b84a", "stroke-width": 3 }))),
  );
  for (const v of ticks(t0, t1)) {
    const tx = x(t0 + v);
    svg.append(
      s("line", { class: "grid", x1: tx, x2: tx, y1: AXIS - 6, y2: height }),
      s("text", { class: "axis", x: tx, y: 14, "text-anchor": v === 0 ? "start" : "middle" }, `+${fmtDuration(v)}`),
    );
  }
  // Labels are skipped where they would overlap the one before (the
  // tooltip of every bar still says it all); ~6.5 units per character.
  const textWidth = (text) => text.length * 6.5;
  lanes.forEach((l, i) => {
    const y = AXIS + i * ROW;
    let free = LABEL_W; // where the next label in this lane may start
    svg.append(
      s("line", { class: "grid", x1: 0, x2: W, y1: y + ROW, y2: y + ROW }),
      s("text", { class: "lane-label", x: 6, y: y + 19 }, l.sub ? s("tspan", { class: "lane-sub" }, `${l.sub} `) : null,
        l.label.length > 24 ? `${l.label.slice(0, 23)}…` : l.label),
    );
    l.segments.forEach((seg, k) => {
      const x1 = x(seg.start);
      const next = k + 1 < l.segments.length ? x(l.segments[k + 1].start) : W;
      const w = Math.max(3, x(seg.end) - x1);
      const dur = fmtDuration(seg.end - seg.start);
      const title = [`${seg.label}${seg.attempt ? ` (attempt ${seg.attempt})` : ""}: ${seg.status}${seg.open ? " (so far)" : ""}`,
        `${fmtTime(seg.start)} → ${seg.open ? "now" : fmtTime(seg.end)} (${dur})`, seg.note || ""].filter(Boolean).join("\n");
      const attrs = { "data-testid": "timeline-bar", "data-lane": l.key, "data-status": seg.status,
        "data-step": seg.step ?? "", "data-attempt": seg.attempt ?? "" };
      const g = s("g", attrs, s("title", {}, title));
      if (seg.kind === "delay") {
        // Low in the lane, so that its label fits above it.
        g.append(s("line", { class: "bar delay", x1, x2: x1 + w, y1: y + 23, y2: y + 23 }));
      } else {
        g.append(s("rect", { class: `bar ${seg.status}${seg.kind === "wait" ? " wait" : ""}`, x: x1, y: y + 7,
          width: w, height: 16, rx: 3 }));
      }
      // Step bars sit in their step's lane: the duration says it all. Attempts,
      // waits and delays also say which one they are.
      const label = seg.kind === "delay" ? seg.label : seg.kind === "wait" || l.key === "attempts" ? `${seg.label} · ${dur}` : dur;
      const inside = w > textWidth(label) + 10;
      const lx = inside ? x1 + 5 : x1 + w + 4;
      // Outside its bar a label must also end before the lane's next bar.
      if (lx >= free && (inside || lx + textWidth(label) <= Math.min(next - 2, W))) {
        g.append(s("text", { class: "dur", x: lx, y: seg.kind === "delay" && inside ? y + 17 : y + 19,
          fill: inside && seg.kind !== "wait" && seg.kind !== "delay" ? "#fff" : null }, label));
        free = lx + textWidth(label) + 6;
      } else {
        free = Math.max(free, x1 + w + 2);
      }
      svg.append(g);
    });
    for (const m of l.markers) {
      const mx = x(m.t);
      svg.append(s("g", { "data-testid": "timeline-marker", "data-kind": m.kind },
        s("title", {}, `${m.label} at ${fmtTime(m.t)}`),
        s("path", { class: `marker ${m.label === "failed" ? "failed" : ""}`, d: `M${mx} ${y + 1} l4 4 l-4 4 l-4 -4 z`,
          fill: "#fff" })));
    }
  });
  const legend = h("div", { class: "legend", "aria-hidden": "true" },
    [["completed", "#3a9d6a"], ["failed", "#d0453a"], ["running", "#3b7dd8"], ["waiting / sleeping", "#f1d27a"],
      ["interrupted or cancelled", "#9aa3ad"]].map(([name, colour]) => {
      const swatch = s("svg", { width: 12, height: 8 }, s("rect", { width: 12, height: 8, rx: 2, fill: colour }));
      return h("span", { class: "swatch" }, swatch, ` ${name}`);
    }),
    h("span", { class: "swatch" }, s("svg", { width: 18, height: 8 },
      s("line", { x1: 0, x2: 18, y1: 4, y2: 4, stroke: "#c9a227", "stroke-width": 2, "stroke-dasharray": "4 3" })),
    " retry delay"));
  return h("div", { class: "timeline" }, svg, legend);
}
