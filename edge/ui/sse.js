// The page's one event stream (PROTOCOL.md, "SSE stream"), read with fetch().
//
// Why fetch() and a reader instead of EventSource: the token travels in the
// Authorization header, not in the URL where proxies and history keep it; we
// choose when to reconnect and send exactly the Last-Event-ID of the last
// event we applied (EventSource resends only what the server's own frames set,
// and retries on its own schedule); we can show the "reconnecting" state and
// read a 401/429/503 answer, which EventSource hides; and we can notice a
// connection that went silent (no keepalive) and replace it, which a phone
// moving between networks needs.

const STALL_MS = 35_000; // Over three times the default keepalive (10 s).
const MAX_BACKOFF_MS = 10_000;

// Splits a text/event-stream into events. Lines end in CRLF, LF or CR; a
// blank line ends an event; lines starting with ":" are comments (keepalive).
export class SseParser {
  constructor() {
    this.buffer = "";
    this.fields = { id: null, event: null, data: [] };
  }

  feed(text) {
    this.buffer += text;
    const events = [];
    let start = 0;
    for (;;) {
      const match = /\r\n|\r|\n/g;
      match.lastIndex = start;
      const found = match.exec(this.buffer);
      // A lone CR at the very end may be the first half of a CRLF.
      if (!found || (found[0] === "\r" && found.index === this.buffer.length - 1)) break;
      const line = this.buffer.slice(start, found.index);
      start = found.index + found[0].length;
      const event = this.line(line);
      if (event) events.push(event);
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  line(line) {
    if (line === "") {
      const { id, event, data } = this.fields;
      this.fields = { id: null, event: null, data: [] };
      if (data.length === 0) return null;
      return { id, event: event || "message", data: data.join("\n") };
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "data") this.fields.data.push(value);
    else if (name === "event") this.fields.event = value;
    else if (name === "id") this.fields.id = value;
    return null;
  }
}

// Event ids are "<digits>-<digits>" and grow strictly within a session.
export function compareIds(a, b) {
  const [a1, a2] = a.split("-").map(BigInt);
  const [b1, b2] = b.split("-").map(BigInt);
  if (a1 !== b1) return a1 < b1 ? -1 : 1;
  if (a2 !== b2) return a2 < b2 ? -1 : 1;
  return 0;
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

// Keeps one stream open for as long as the page wants it, resuming after the
// last applied event whenever it breaks. States reported to onState:
// "connecting", "open", "reconnecting", "closed". Every event with an id is
// delivered once: replays at or below the last applied id are dropped here.
export class EventStream {
  constructor({ url, headers, onEvent, onState, onError }) {
    this.url = url;
    this.headers = headers;
    this.onEvent = onEvent;
    this.onState = onState;
    this.onError = onError;
    this.lastEventId = null;
    this.stopped = false;
    this.controller = null;
    this.wake = null;
  }

  start() {
    this.run();
    // Coming back online is a better moment to retry than the backoff timer;
    // going offline means the open connection is most likely dead already
    // (a phone changing networks), though the browser may not notice for long.
    this.online = () => this.wake?.abort();
    this.offline = () => this.controller?.abort();
    window.addEventListener("online", this.online);
    window.addEventListener("offline", this.offline);
  }

  stop() {
    this.stopped = true;
    this.controller?.abort();
    this.wake?.abort();
    window.removeEventListener("online", this.online);
    window.removeEventListener("offline", this.offline);
    this.onState("closed");
  }

  // Drops the current connection now; the loop reconnects with Last-Event-ID.
  reconnect() {
    this.controller?.abort();
  }

  async run() {
    let failures = 0;
    while (!this.stopped) {
      this.onState(this.lastEventId === null && failures === 0 ? "connecting" : "reconnecting");
      const outcome = await this.connectOnce();
      if (this.stopped) return;
      if (outcome.fatal) {
        this.onState("closed");
        return;
      }
      failures = outcome.opened ? 1 : failures + 1;
      const backoff = Math.min(MAX_BACKOFF_MS, 250 * 2 ** Math.min(failures, 6));
      const wait = outcome.retryAfterMs ?? backoff * (0.75 + Math.random() / 2);
      this.onState("reconnecting");
      this.wake = new AbortController();
      await sleep(wait, this.wake.signal);
    }
  }

  // One connection, from the request to its end. Never throws.
  async connectOnce() {
    const controller = new AbortController();
    this.controller = controller;
    let stall = null;
    const armStall = () => {
      clearTimeout(stall);
      stall = setTimeout(() => controller.abort(), STALL_MS);
    };
    const outcome = { opened: false, fatal: false, retryAfterMs: null };
    try {
      const headers = { ...this.headers(), Accept: "text/event-stream" };
      if (this.lastEventId !== null) headers["Last-Event-ID"] = this.lastEventId;
      armStall();
      const response = await fetch(this.url, {
        headers,
        cache: "no-store",
        credentials: "same-origin",
        signal: controller.signal,
      });
      if (!response.ok) {
        await this.refused(response, outcome);
        return outcome;
      }

      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      const parser = new SseParser();
      for (;;) {
        armStall();
        const { value, done } = await reader.read();
        if (done) break;
        for (const event of parser.feed(value)) {
          if (this.deliver(event)) outcome.opened = true;
        }
      }
    } catch (error) {
      // An abort (ours, or a stall) or a network failure: both mean reconnect.
      if (error?.name !== "AbortError" && !(error instanceof TypeError)) {
        this.onError?.(error);
      }
    } finally {
      clearTimeout(stall);
    }
    return outcome;
  }

  async refused(response, outcome) {
    let body = {};
    try {
      body = await response.json();
    } catch {
      // A proxy's HTML error page: the status says enough.
    }
    const seconds = Number(response.headers.get("Retry-After") ?? body.retry_after);
    if (Number.isFinite(seconds) && seconds > 0) outcome.retryAfterMs = seconds * 1000;
    if (response.status === 401) {
      outcome.fatal = true;
      this.onError?.({ status: 401, ...body });
    } else if (body.error === "bad_last_event_id") {
      // Start afresh; the page reloads what it shows from the API.
      this.lastEventId = null;
      outcome.retryAfterMs = 0;
      this.onEvent({ event: "chat_service", id: null, data: { type: "stream.gap", data: {} } });
    }
  }

  // Applies one event; true when it was the stream's "ready".
  deliver(raw) {
    let data;
    try {
      data = JSON.parse(raw.data);
    } catch {
      return false;
    }
    if (raw.event === "ready") {
      // Its id is the stream's starting cursor: resuming from it replays
      // everything this stream would have seen.
      if (raw.id) this.lastEventId = raw.id;
      this.onState("open");
      this.onEvent({ event: "ready", id: raw.id, data });
      return true;
    }
    if (raw.id) {
      if (this.lastEventId !== null && compareIds(raw.id, this.lastEventId) <= 0) return false;
      this.lastEventId = raw.id;
    }
    this.onEvent({ event: raw.event, id: raw.id, data });
    return false;
  }
}
