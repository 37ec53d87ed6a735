// The HTTP side of PROTOCOL.md: sign-in mode, conversations, submissions,
// cancel. Every failure becomes an ApiError carrying the server's code,
// detail and Retry-After, and describeError turns it into a sentence.

const TOKEN_KEY = "kdcube.token";

// The page's sign-in mode, from the server (`/config.json`); dev when absent.
export async function loadConfig() {
  try {
    const response = await fetch("/config.json", { cache: "no-store" });
    if (response.ok) {
      const body = await response.json();
      return { auth: body.auth === "oidc" ? "oidc" : "dev", loginUrl: body.login_url || null };
    }
  } catch {
    // Unreachable or not JSON: fall through to the development default.
  }
  return { auth: "dev", loginUrl: null };
}

export class ApiError extends Error {
  constructor(status, body, retryAfter) {
    super(body.detail || body.error || `HTTP ${status}`);
    this.status = status;
    this.code = body.error || null;
    this.detail = body.detail || null;
    this.retryAfter = retryAfter;
  }
}

// Dev tokens are kept in localStorage; in OIDC mode the login proxy's cookies
// carry identity and the page sends no Authorization header.
export const tokens = {
  get: () => localStorage.getItem(TOKEN_KEY),
  set: (token) => localStorage.setItem(TOKEN_KEY, token),
  clear: () => localStorage.removeItem(TOKEN_KEY),
};

export const DEV_USER = /^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$/;

export class Api {
  constructor({ onUnauthorized }) {
    this.onUnauthorized = onUnauthorized;
  }

  headers() {
    const token = tokens.get();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  async request(method, path, { json, form } = {}) {
    const init = { method, headers: this.headers(), credentials: "same-origin" };
    if (json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(json);
    } else if (form !== undefined) {
      init.body = form; // The browser writes the multipart boundary itself.
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch {
      throw new ApiError(0, { error: "network", detail: "The server could not be reached." }, null);
    }
    let body = {};
    try {
      body = await response.json();
    } catch {
      // Not JSON (a proxy's error page): the status alone must do.
    }
    if (response.ok) return body;
    const header = Number(response.headers.get("Retry-After"));
    const retryAfter = Number.isFinite(header) && header > 0 ? header : (body.retry_after ?? null);
    const error = new ApiError(response.status, body, retryAfter);
    if (response.status === 401) this.onUnauthorized(error);
    throw error;
  }

  listConversations() {
    return this.request("GET", "/api/conversations");
  }

  getConversation(id) {
    return this.request("GET", `/api/conversations/${encodeURIComponent(id)}`);
  }

  deleteConversation(id) {
    return this.request("DELETE", `/api/conversations/${encodeURIComponent(id)}`);
  }

  // A prompt, as JSON, or as multipart when files come with it (the
  // event_submission part first, as PROTOCOL.md requires).
  submit(streamId, { text, conversationId, bundleId, files }) {
    const body = {
      external_events: [
        { type: "event.user.prompt", payload: { mime: "text/plain", event: { text } } },
      ],
    };
    if (conversationId) body.conversation_id = conversationId;
    if (bundleId) body.bundle_id = bundleId;
    const path = `/sse/chat?stream_id=${encodeURIComponent(streamId)}`;
    if (!files || files.length === 0) return this.request("POST", path, { json: body });
    const form = new FormData();
    form.append("event_submission", JSON.stringify(body));
    for (const file of files) form.append("files", file, file.name);
    return this.request("POST", path, { form });
  }

  cancel(streamId, conversationId) {
    // Without turn_id: every queued and running turn of the conversation.
    const path = `/sse/cancel?stream_id=${encodeURIComponent(streamId)}`;
    return this.request("POST", path, { json: { conversation_id: conversationId } });
  }

  attachmentUrl(conversationId, turnId, name) {
    const parts = [conversationId, "turns", turnId, "attachments", name];
    return `/api/conversations/${parts.map(encodeURIComponent).join("/")}`;
  }
}

const BUSY_REASONS = {
  queue_size_exceeded: "too many questions are waiting",
  no_healthy_processes: "no assistant is running right now",
  anonymous_threshold: "it is at capacity for guests",
  registered_threshold: "it is at capacity",
  paid_threshold: "it is at capacity",
  hard_limit: "it is at its limit",
};

// One sentence a person can act on.
export function describeError(error) {
  if (!(error instanceof ApiError)) return String(error?.message || error);
  const wait = error.retryAfter ? ` Try again in ${formatWait(error.retryAfter)}.` : "";
  switch (error.code) {
    case "network":
      return "The server could not be reached. Check your connection and try again.";
    case "rate_limited":
      return `You are sending messages too quickly.${wait || " Wait a moment and try again."}`;
    case "system_busy": {
      const reason = BUSY_REASONS[error.detail] || "it is busy";
      return `The service cannot take your message now: ${reason}.${wait}`;
    }
    case "draining":
      return `The server is restarting.${wait || " Try again shortly."}`;
    case "dependency_unavailable":
      return `The service is having trouble reaching its storage.${wait}`;
    case "attachment_rejected":
      return `File rejected — ${error.detail}. Nothing was sent.`;
    case "request_entity_too_large":
      return "The message and its files are too large (25 MB in all at most). Nothing was sent.";
    case "input_too_long":
      return "The message is too long. Shorten it and try again.";
    case "conversation_busy":
      return "This conversation is still answering. Stop it or wait, then try again.";
    case "conversation_not_found":
      return "This conversation no longer exists.";
    case "invalid_token":
      return "You are signed out. Sign in again.";
    default:
      if (error.status === 503) return `The service is unavailable.${wait}`;
      if (error.status === 429) return `Too many requests.${wait}`;
      return error.detail || `The request failed (HTTP ${error.status}).`;
  }
}

export function formatWait(seconds) {
  const s = Math.max(1, Math.ceil(Number(seconds)));
  if (s < 60) return `${s} second${s === 1 ? "" : "s"}`;
  const m = Math.ceil(s / 60);
  return `${m} minute${m === 1 ? "" : "s"}`;
}
