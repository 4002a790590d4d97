// DOM and formatting helpers. Text always goes in as text nodes, never as
// HTML, so run payloads, errors and logs cannot inject markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      node.addEventListener(key.slice(2), value);
    } else if (key === "dataset") {
      Object.assign(node.dataset, value);
    } else {
      node.setAttribute(key, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** h("a", {href: "#/runs"}, "Runs"): an HTML element. */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** s("rect", {x: 1}): an SVG element. */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Empty `node`, then append `children` (null, undefined and false are skipped). */
export function clear(node, ...children) {
  while (node.firstChild) node.firstChild.remove();
  return build(node, {}, children);
}

const pad = (n, w = 2) => String(n).padStart(w, "0");

/** Local date and time of ms since the epoch: 2024-05-01 14:03:07.250 */
export function fmtTime(ms) {
  if (ms === null || ms === undefined) return "–";
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

/** A duration in ms as people read it: 340 ms, 2.4 s, 3 m 05 s, 2 h 10 m, 3 d 4 h. */
export function fmtDuration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "–";
  const neg = ms < 0;
  ms = Math.abs(ms);
  let text;
  if (ms < 1000) text = `${Math.round(ms)} ms`;
  else if (ms < 60_000) text = `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
  else if (ms < 3_600_000) text = `${Math.floor(ms / 60_000)} m ${pad(Math.floor(ms / 1000) % 60)} s`;
  else if (ms < 86_400_000) text = `${Math.floor(ms / 3_600_000)} h ${pad(Math.floor(ms / 60_000) % 60)} m`;
  else text = `${Math.floor(ms / 86_400_000)} d ${Math.floor(ms / 3_600_000) % 24} h`;
  return neg ? `-${text}` : text;
}

/** "in 4 m 10 s" / "12 s ago" relative to now. */
export function fmtRelative(ms) {
  if (ms === null || ms === undefined) return "–";
  const delta = ms - Date.now();
  return delta >= 0 ? `in ${fmtDuration(delta)}` : `${fmtDuration(-delta)} ago`;
}

export function timeEl(ms) {
  if (ms === null || ms === undefined) return h("span", { class: "muted" }, "–");
  return h("time", { datetime: new Date(ms).toISOString(), title: fmtRelative(ms) }, fmtTime(ms));
}

export function jsonText(value) {
  return value === undefined ? "" : JSON.stringify(value, null, 2);
}

export function jsonBlock(value, testid) {
  return h("pre", { class: "json", "data-testid": testid }, value === undefined ? "–" : jsonText(value));
}

export const LIVE_STATUSES = ["pending", "running", "suspended", "retrying"];
export const STATUSES = [...LIVE_STATUSES, "completed", "failed", "cancelled", "expired"];

export function statusBadge(status, deadLettered) {
  const badges = [h("span", { class: `badge ${status}`, "data-testid": "status" }, status)];
  if (deadLettered) badges.push(" ", h("span", { class: "badge dead", "data-testid": "dead-letter" }, "dead letter"));
  return badges;
}

export function runLink(runId, text) {
  return h("a", { href: `#/runs/${encodeURIComponent(runId)}`, class: "mono", "data-testid": "run-link" },
    text || runId);
}

/** Parse the text of a JSON editor; {ok, value} or {ok: false, message}. */
export function parseJson(text) {
  try {
    return { ok: true, value: JSON.parse(text) };
  } catch (err) {
    return { ok: false, message: `Not valid JSON: ${err.message}` };
  }
}

/** A datetime-local input's value as ms since the epoch, or "" when empty. */
export function localInputToMs(value) {
  if (!value) return "";
  const ms = new Date(value).getTime();
  return Number.isNaN(ms) ? "" : String(ms);
}

export function msToLocalInput(ms) {
  if (!ms) return "";
  const d = new Date(Number(ms));
  if (Number.isNaN(d.getTime())) return "";
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/** Items of an API list answer, whether a bare array or {key: [...]}. */
export function listOf(answer, key) {
  if (Array.isArray(answer)) return answer;
  if (answer && Array.isArray(answer[key])) return answer[key];
  return [];
}
