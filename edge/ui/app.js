// The chat page: sign-in, the conversation list, the transcript and the
// composer, all driven by PROTOCOL.md through api.js and one EventStream.
//
// `?bundle=ID` in the page's URL sends new prompts to that bundle instead of
// the server's default (the API offers no bundle list to ordinary users).

import { Api, DEV_USER, describeError, loadConfig, tokens } from "./api.js";
import { EventStream } from "./sse.js";
import { formatSize, TurnView } from "./turn.js";

const $ = (id) => document.getElementById(id);

const state = {
  config: { auth: "dev", loginUrl: null },
  api: null,
  stream: null,
  // One stream per page: the server aims a turn's events at the stream_id
  // that submitted it.
  streamId: `ui-${crypto.randomUUID()}`,
  ready: false,
  conversations: [],
  currentId: null,
  views: new Map(), // turn_id -> TurnView, for the open conversation
  running: new Set(), // turn ids of the open conversation not yet ended
  pending: null, // the TurnView whose submission awaits its answer
  files: [],
  bundleId: new URLSearchParams(location.search).get("bundle"),
  sending: false,
  noticeTimer: 0,
  deleteArmed: 0,
};

// ---- sign-in --------------------------------------------------------------

async function main() {
  state.config = await loadConfig();
  state.api = new Api({ onUnauthorized: signedOut });
  wireControls();
  if (state.config.auth === "dev" && !tokens.get()) showSignIn();
  else startApp();
}

function showSignIn(message = "") {
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message;
  $("signin-name").focus();
}

function signIn(event) {
  event.preventDefault();
  const name = $("signin-name").value.trim();
  if (!DEV_USER.test(name)) {
    $("signin-error").textContent = name
      ? "Use letters, digits and _ . @ - only, starting with a letter or digit."
      : "Enter a name to sign in.";
    return;
  }
  tokens.set(`dev-${name}`);
  startApp();
}

function signedOut() {
  stopApp();
  if (state.config.auth === "oidc") {
    if (state.config.loginUrl) {
      location.assign(state.config.loginUrl);
    } else {
      showNotice("Your session has ended. Sign in again through your organisation's login page.");
    }
    return;
  }
  tokens.clear();
  showSignIn("Your sign-in was refused. Sign in again.");
}

function signOut() {
  stopApp();
  tokens.clear();
  $("signin-name").value = "";
  showSignIn();
}

function currentUser() {
  const token = tokens.get();
  return token?.startsWith("dev-") ? token.slice(4) : "";
}

function startApp() {
  $("signin").hidden = true;
  $("app").hidden = false;
  $("user-name").textContent = currentUser();
  $("signout-button").hidden = state.config.auth !== "dev";
  state.stream = new EventStream({
    url: `/sse/stream?stream_id=${encodeURIComponent(state.streamId)}`,
    headers: () => state.api.headers(),
    onEvent,
    onState: connectionState,
    onError: (error) => {
      if (error?.status === 401) signedOut();
    },
  });
  state.stream.start();
  refreshList({ quiet: false });
  openFromHash();
  $("prompt").focus();
}

function stopApp() {
  state.stream?.stop();
  state.stream = null;
  state.ready = false;
  resetTranscript();
  state.currentId = null;
  state.conversations = [];
  renderList();
}

// ---- connection state -----------------------------------------------------

const CONNECTION_LABELS = {
  connecting: "Connecting…",
  open: "Connected",
  reconnecting: "Reconnecting…",
  closed: "Disconnected",
};

function connectionState(name) {
  const label = $("connection");
  const shown = name === "reconnecting" && !navigator.onLine ? "Offline — reconnecting…" : null;
  label.dataset.state = name;
  label.textContent = shown || CONNECTION_LABELS[name];
  $("reconnecting").hidden = name !== "reconnecting";
  if (name === "open") state.ready = true;
  updateComposer();
}

// ---- events ---------------------------------------------------------------

function onEvent({ event, data }) {
  if (event === "ready" || event === "server_shutdown") return;
  if (event === "chat_service") {
    serviceNotice(data);
    return;
  }
  const conversationId = data.conversation?.conversation_id;
  const turnId = data.conversation?.turn_id;
  if (event === "conv_status") {
    conversationStatus(conversationId, data.data || {});
    return;
  }

  const view = viewFor(conversationId, turnId);
  if (!view) {
    if (event === "chat_complete" || event === "chat_error") refreshList();
    return;
  }
  switch (event) {
    case "chat_start":
      state.running.add(turnId);
      if (!view.finished) view.setStatus("waiting", "Thinking…");
      break;
    case "chat_delta":
      if (data.delta) view.delta(data.delta);
      break;
    case "chat_step":
      view.step(data);
      break;
    case "chat_complete":
      view.complete(data.data?.final_answer);
      turnEnded(turnId, "The answer is complete.");
      break;
    case "chat_error":
      view.fail(data.data);
      turnEnded(turnId, view.status.textContent);
      break;
    default:
      return;
  }
  keepScrolled();
  updateComposer();
}

// The view an event belongs to. Events can outrun the submission's own
// answer, so the first event of an unknown turn claims the pending view.
function viewFor(conversationId, turnId) {
  if (!turnId) return null;
  const known = state.views.get(turnId);
  if (known) return known;
  const pending = state.pending;
  const target = pending ? pending.conversationId || conversationId : state.currentId;
  if (pending && !pending.turnId && target === conversationId) {
    adopt(pending, turnId, conversationId);
    return pending;
  }
  if (conversationId !== state.currentId || !state.currentId) return null;
  // A turn of the open conversation sent from another page of this session.
  const view = new TurnView({ turnId, prompt: "", onFollowup: sendText });
  view.partial = true;
  addView(view);
  state.views.set(turnId, view);
  return view;
}

function adopt(view, turnId, conversationId) {
  view.bind(turnId);
  state.views.set(turnId, view);
  if (!view.finished) state.running.add(turnId);
  if (!state.currentId) setCurrent(conversationId);
}

function turnEnded(turnId, announcement) {
  state.running.delete(turnId);
  $("announcer").textContent = announcement;
  refreshList();
}

function conversationStatus(conversationId, data) {
  const item = state.conversations.find((c) => c.conversation_id === conversationId);
  if (item) {
    item.state = data.state;
    renderList();
  } else if (data.state === "in_progress") {
    refreshList();
  }
}

function serviceNotice(data) {
  const type = data?.type;
  if (type === "stream.gap") {
    showNotice("Some live updates were missed; the conversation was reloaded.");
    if (state.currentId) openConversation(state.currentId, { keepNotice: true });
  } else if (type === "turn.rerun") {
    state.views.get(data.conversation?.turn_id)?.reset();
  }
  // Gateway notices (rate limit, backpressure) also come back as the HTTP
  // answer to the submission, which is where they are shown.
}

// ---- conversations --------------------------------------------------------

// Background refreshes stay quiet when they fail (a rate limit on reads, a
// blip): the list is only a convenience, and the next refresh mends it.
async function refreshList({ quiet = true } = {}) {
  try {
    const body = await state.api.listConversations();
    state.conversations = body.conversations || [];
    renderList();
  } catch (error) {
    if (!quiet && error.status !== 401) showNotice(describeError(error), error.retryAfter);
  }
}

function renderList() {
  const list = $("conversation-list");
  list.replaceChildren();
  for (const conversation of state.conversations) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "conversation";
    button.dataset.conversationId = conversation.conversation_id;
    if (conversation.conversation_id === state.currentId) {
      button.setAttribute("aria-current", "true");
    }
    const title = document.createElement("span");
    title.className = "conversation-title";
    title.textContent = conversation.title || "Untitled";
    const meta = document.createElement("span");
    meta.className = "conversation-meta";
    meta.textContent =
      conversation.state === "in_progress" ? "answering…" : timeAgo(conversation.updated_at);
    button.append(title, meta);
    button.addEventListener("click", () => {
      location.hash = `#/c/${encodeURIComponent(conversation.conversation_id)}`;
      closeNav();
    });
    item.append(button);
    list.append(item);
  }
  $("conversation-empty").hidden = state.conversations.length > 0;
  const current = state.conversations.find((c) => c.conversation_id === state.currentId);
  $("chat-title").textContent = current?.title || (state.currentId ? "Conversation" : "New conversation");
}

function timeAgo(ms) {
  if (!ms) return "";
  const seconds = Math.max(0, (Date.now() - ms) / 1000);
  if (seconds < 60) return "just now";
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

function openFromHash() {
  const match = /^#\/c\/(.+)$/.exec(location.hash);
  const id = match ? decodeURIComponent(match[1]) : null;
  if (id === state.currentId && id !== null) return;
  if (id) openConversation(id);
  else newConversation();
}

function setCurrent(conversationId) {
  state.currentId = conversationId;
  const hash = conversationId ? `#/c/${encodeURIComponent(conversationId)}` : "";
  if (location.hash !== hash) history.replaceState(null, "", hash || location.pathname + location.search);
  $("delete-button").hidden = !conversationId;
  disarmDelete();
  renderList();
}

function resetTranscript() {
  for (const view of state.views.values()) view.root.remove();
  for (const node of $("transcript").querySelectorAll(".turn")) node.remove();
  state.views.clear();
  state.running.clear();
  state.pending = null;
  $("welcome").hidden = false;
  updateComposer();
}

function newConversation() {
  resetTranscript();
  setCurrent(null);
  hideNotice();
  $("prompt").focus();
}

async function openConversation(id, { keepNotice = false } = {}) {
  resetTranscript();
  setCurrent(id);
  if (!keepNotice) hideNotice();
  let body;
  try {
    body = await state.api.getConversation(id);
  } catch (error) {
    if (error.status === 401) return;
    showNotice(describeError(error), error.retryAfter);
    if (error.status === 404) {
      setCurrent(null);
      refreshList();
    }
    return;
  }
  if (state.currentId !== id) return; // Another one was opened meanwhile.
  for (const record of body.turns || []) {
    if (state.views.has(record.turn_id)) continue; // Already live from the stream.
    const view = TurnView.fromRecord(record, sendText);
    if (record.state === "queued" || record.state === "running") state.running.add(record.turn_id);
    state.views.set(record.turn_id, view);
    addView(view);
  }
  $("chat-title").textContent = body.title || "Conversation";
  updateComposer();
  scrollToEnd();
}

function addView(view) {
  // Suggestions belong to the latest answer only.
  for (const box of $("transcript").querySelectorAll(".followups")) box.hidden = true;
  $("welcome").hidden = true;
  $("transcript").append(view.root);
}

async function deleteConversation() {
  const button = $("delete-button");
  if (!state.deleteArmed) {
    // Two presses, so a stray tap cannot delete a conversation.
    button.textContent = "Delete? Press again";
    button.classList.add("armed");
    state.deleteArmed = setTimeout(disarmDelete, 4000);
    return;
  }
  disarmDelete();
  const id = state.currentId;
  try {
    await state.api.deleteConversation(id);
  } catch (error) {
    showNotice(describeError(error), error.retryAfter);
    return;
  }
  location.hash = "";
  newConversation();
  refreshList();
}

function disarmDelete() {
  clearTimeout(state.deleteArmed);
  state.deleteArmed = 0;
  $("delete-button").textContent = "Delete";
  $("delete-button").classList.remove("armed");
}

// ---- composer -------------------------------------------------------------

function sendText(text) {
  if (state.sending || !state.ready) return;
  $("prompt").value = text;
  submit();
}

async function submit(event) {
  event?.preventDefault();
  const prompt = $("prompt");
  const text = prompt.value.trim();
  if (!text || state.sending || !state.ready) return;
  hideNotice();
  const files = [...state.files];
  const view = new TurnView({ prompt: text, files, onFollowup: sendText });
  view.conversationId = state.currentId;
  view.setStatus("sending", files.length ? "Uploading and scanning files…" : "Sending…");
  addView(view);
  scrollToEnd();
  state.pending = view;
  state.sending = true;
  prompt.value = "";
  setFiles([]);
  updateComposer();
  try {
    const ack = await state.api.submit(state.streamId, {
      text,
      conversationId: state.currentId,
      bundleId: state.bundleId,
      files,
    });
    if (!view.turnId) adopt(view, ack.turn_id, ack.conversation_id);
    if (!view.finished && view.root.dataset.state === "sending") {
      view.setStatus("waiting", "Waiting for the assistant…");
    }
    if (files.length) showScanResults(view, ack.conversation_id, ack.turn_id);
    refreshList();
  } catch (error) {
    view.root.remove();
    if (!state.views.size) $("welcome").hidden = false;
    // Give the message back, so nothing typed is lost.
    prompt.value = text;
    setFiles(files, error.code === "attachment_rejected" ? error.detail : null);
    if (error.status !== 401) showNotice(describeError(error), error.retryAfter);
  } finally {
    state.pending = null;
    state.sending = false;
    updateComposer();
    autoGrow();
  }
}

// The stored turn lists each file with its scan result.
async function showScanResults(view, conversationId, turnId) {
  try {
    const body = await state.api.getConversation(conversationId);
    const record = (body.turns || []).find((t) => t.turn_id === turnId);
    if (record) view.setFiles(record.attachments || []);
  } catch {
    // The files were accepted; only their labels stay at "checking".
  }
}

async function stop() {
  if (!state.currentId) return;
  $("stop-button").disabled = true;
  for (const turnId of state.running) {
    state.views.get(turnId)?.setStatus("working", "Stopping…");
  }
  try {
    await state.api.cancel(state.streamId, state.currentId);
  } catch (error) {
    if (error.code !== "turn_not_active") showNotice(describeError(error), error.retryAfter);
  } finally {
    $("stop-button").disabled = false;
  }
}

function updateComposer() {
  const hasText = $("prompt").value.trim() !== "";
  $("send-button").disabled = !state.ready || state.sending || !hasText;
  $("stop-button").hidden = state.running.size === 0;
}

function setFiles(files, rejection = null) {
  state.files = files;
  const list = $("file-list");
  list.replaceChildren();
  // "name: reason": mark the file the server named.
  const rejectedName = rejection ? rejection.split(": ")[0] : null;
  for (const file of files) {
    const item = document.createElement("li");
    item.className = "file-chip";
    if (file.name === rejectedName) item.classList.add("rejected");
    const label = document.createElement("span");
    label.textContent = `${file.name} · ${formatSize(file.size)}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "chip-remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${file.name}`);
    remove.addEventListener("click", () => setFiles(state.files.filter((f) => f !== file)));
    item.append(label, remove);
    list.append(item);
  }
  list.hidden = files.length === 0;
}

function showNotice(message, retryAfter = null) {
  const notice = $("notice");
  clearInterval(state.noticeTimer);
  notice.hidden = false;
  notice.textContent = message;
  if (!retryAfter) return;
  // Count the wait down, so the person sees when to try again.
  const until = Date.now() + retryAfter * 1000;
  const base = message.replace(/ Try again in .*$/, "");
  state.noticeTimer = setInterval(() => {
    const left = Math.ceil((until - Date.now()) / 1000);
    if (left <= 0) {
      clearInterval(state.noticeTimer);
      notice.textContent = `${base} You can try again now.`;
      return;
    }
    notice.textContent = `${base} Try again in ${left} second${left === 1 ? "" : "s"}.`;
  }, 1000);
}

function hideNotice() {
  clearInterval(state.noticeTimer);
  $("notice").hidden = true;
  $("notice").textContent = "";
}

function autoGrow() {
  const prompt = $("prompt");
  prompt.style.height = "";
  if (prompt.value && prompt.scrollHeight > prompt.clientHeight) {
    prompt.style.height = `${Math.min(prompt.scrollHeight + 2, 200)}px`;
  }
}

function nearBottom() {
  const box = $("transcript");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 120;
}

function keepScrolled() {
  if (nearBottom()) requestAnimationFrame(scrollToEnd);
}

function scrollToEnd() {
  const box = $("transcript");
  box.scrollTop = box.scrollHeight;
}

// ---- navigation on small screens ------------------------------------------

function toggleNav() {
  const open = !document.body.classList.contains("nav-open");
  document.body.classList.toggle("nav-open", open);
  $("menu-button").setAttribute("aria-expanded", String(open));
  $("scrim").hidden = !open;
}

function closeNav() {
  document.body.classList.remove("nav-open");
  $("menu-button").setAttribute("aria-expanded", "false");
  $("scrim").hidden = true;
}

function wireControls() {
  $("signin-form").addEventListener("submit", signIn);
  $("signout-button").addEventListener("click", signOut);
  $("composer").addEventListener("submit", submit);
  $("prompt").addEventListener("input", () => {
    autoGrow();
    updateComposer();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) submit(event);
  });
  $("attach-button").addEventListener("click", () => $("file-input").click());
  $("file-input").addEventListener("change", () => {
    setFiles([...state.files, ...$("file-input").files]);
    $("file-input").value = "";
    hideNotice();
  });
  $("stop-button").addEventListener("click", stop);
  $("new-button").addEventListener("click", () => {
    closeNav();
    if (location.hash) location.hash = "";
    else newConversation();
  });
  $("delete-button").addEventListener("click", deleteConversation);
  $("menu-button").addEventListener("click", toggleNav);
  $("scrim").addEventListener("click", closeNav);
  window.addEventListener("hashchange", openFromHash);
  window.addEventListener("offline", () => connectionState($("connection").dataset.state));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") closeNav();
  });
}

main();
