// The /v1/ API: JSON requests with the bearer token, and the live stream.
//
// The token lives in sessionStorage: it survives reloads of this tab and
// is gone when the tab closes. With auth off (`stepline dev`) there is none.

const TOKEN_KEY = "stepline.token";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const auth = {
  required: false,
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
  // Set by the app: asks the person for a token, resolves when one is given.
  onUnauthorized: null,
};

function headers(extra) {
  const out = { Accept: "application/json", ...extra };
  if (auth.required && auth.token) out.Authorization = `Bearer ${auth.token}`;
  return out;
}

/** A /v1/ call; the parsed JSON answer, or an ApiError with the server's message. */
export async function api(path, { method = "GET", body, query } = {}) {
  let url = path;
  if (query) {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(query)) {
      if (value !== undefined && value !== null && value !== "") params.set(key, String(value));
    }
    const qs = params.toString();
    if (qs) url += `?${qs}`;
  }
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const resp = await fetch(url, init);
  if (resp.status === 401 && auth.required && auth.onUnauthorized) {
    auth.token = null;
    await auth.onUnauthorized("The token was refused; enter the API token again.");
    return api(path, { method, body, query });
  }
  let data = null;
  const text = await resp.text();
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { error: text };
    }
  }
  if (!resp.ok) {
    throw new ApiError(resp.status, (data && data.error) || `${resp.status} ${resp.statusText}`);
  }
  return data;
}

/** Whether the API wants a token: /v1/info, else a probe of /v1/runs. */
export async function discoverAuth() {
  try {
    const resp = await fetch("/v1/info", { headers: { Accept: "application/json" } });
    if (resp.ok) {
      const info = await resp.json();
      auth.required = Boolean(info.auth);
      return info;
    }
  } catch {
    // fall through to the probe
  }
  const probe = await fetch("/v1/runs?limit=1", { headers: { Accept: "application/json" } });
  auth.required = probe.status === 401;
  return { auth: auth.required, version: null };
}

/**
 * The live stream of run changes. `onRun(summary)` for each change;
 * `onResync()` when the server had too much to send (reload what is shown);
 * `onState("live" | "connecting" | "off")` as the connection goes.
 * EventSource reconnects by itself; a refused token stops it.
 */
export class RunStream {
  constructor(onRun, onResync, onState) {
    this.onRun = onRun;
    this.onResync = onResync;
    this.onState = onState;
    this.source = null;
  }

  open() {
    this.close();
    let url = "/v1/stream";
    // EventSource cannot send headers: this one route takes the token in the query.
    if (auth.required && auth.token) url += `?token=${encodeURIComponent(auth.token)}`;
    const source = new EventSource(url);
    this.source = source;
    this.onState("connecting");
    // After a reconnect, changes made meanwhile were not sent: reload once.
    let opened = false;
    source.addEventListener("open", () => {
      this.onState("live");
      if (opened) this.onResync();
      opened = true;
    });
    source.addEventListener("resync", () => this.onResync());
    source.addEventListener("error", () => {
      this.onState(source.readyState === EventSource.CLOSED ? "off" : "connecting");
    });
    source.addEventListener("run", (ev) => {
      let summary;
      try {
        summary = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (summary && summary.run_id) this.onRun(summary);
    });
  }

  close() {
    if (this.source) this.source.close();
    this.source = null;
    this.onState("off");
  }
}
