// One question and its answer in the transcript, fed by the turn's events.

import { renderMarkdown } from "./markdown.js";

const SCAN_LABELS = {
  clean: "scanned, clean",
  unscanned: "not scanned",
  failed: "scan failed, let through",
};

const ERROR_LABELS = {
  cancelled: "Stopped.",
  turn_interrupted: "Interrupted: the server stopped while answering.",
  timeout: "The assistant took too long and was stopped.",
  bundle_error: "The assistant failed",
  superseded: "Replaced by a newer message.",
};

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

export class TurnView {
  constructor({ turnId = null, prompt, files = [], onFollowup }) {
    this.turnId = turnId;
    this.onFollowup = onFollowup;
    // Deltas by marker, each an array by delta index: a replayed or repeated
    // delta lands on its own slot, so text is never doubled.
    this.parts = new Map();
    this.steps = new Map();
    this.finished = false;
    // Set when the view was built from history while the turn still ran:
    // the earlier deltas were never seen, so the final answer replaces them.
    this.partial = false;
    this.frame = 0;

    this.root = element("article", "turn");
    const user = element("div", "message user");
    const bubble = element("div", "bubble");
    bubble.textContent = prompt;
    this.fileList = element("ul", "attachments");
    user.append(bubble, this.fileList);
    this.setFiles(files.map((f) => ({ name: f.name, size: f.size, scan: "pending" })));

    const assistant = element("div", "message assistant");
    this.stepsBox = element("details", "steps");
    this.stepsBox.hidden = true;
    this.stepsSummary = element("summary", "", "Steps");
    this.timeline = element("ol", "timeline");
    this.stepsBox.append(this.stepsSummary, this.timeline);

    this.thinkingBox = element("details", "thinking");
    this.thinkingBox.hidden = true;
    this.thinkingBox.append(element("summary", "", "Thinking"));
    this.thinking = element("div", "thinking-text markdown");
    this.thinkingBox.append(this.thinking);

    this.answer = element("div", "answer markdown");
    this.answer.setAttribute("aria-live", "polite");
    this.answer.setAttribute("aria-label", "Answer");
    this.status = element("p", "turn-status");
    this.followups = element("div", "followups");
    this.followups.hidden = true;
    assistant.append(this.stepsBox, this.thinkingBox, this.answer, this.status, this.followups);
    this.root.append(user, assistant);
    this.bind(turnId);
  }

  bind(turnId) {
    this.turnId = turnId;
    if (turnId) this.root.dataset.turnId = turnId;
  }

  setStatus(kind, text) {
    this.root.dataset.state = kind;
    this.status.className = `turn-status ${kind}`;
    this.status.textContent = text || "";
    const busy = kind === "sending" || kind === "waiting" || kind === "working";
    this.answer.setAttribute("aria-busy", busy ? "true" : "false");
    this.answer.classList.toggle("streaming", busy);
  }

  setFiles(files) {
    this.fileList.replaceChildren();
    for (const file of files) {
      const item = element("li", `attachment scan-${file.scan}`);
      item.append(element("span", "attachment-name", file.name));
      const scan = file.scan === "pending" ? "checking…" : SCAN_LABELS[file.scan] || file.scan;
      const size = file.size !== undefined ? `${formatSize(file.size)} · ` : "";
      item.append(element("span", "attachment-scan", `${size}${scan}`));
      this.fileList.append(item);
    }
    this.fileList.hidden = files.length === 0;
  }

  // The turn started again from scratch (a rerun after a lost processor).
  reset() {
    this.parts.clear();
    this.steps.clear();
    this.timeline.replaceChildren();
    this.stepsBox.hidden = true;
    this.thinkingBox.hidden = true;
    this.followups.hidden = true;
    this.finished = false;
    this.render();
  }

  delta(delta) {
    const marker = delta.marker || "answer";
    if (!this.parts.has(marker)) this.parts.set(marker, []);
    const slots = this.parts.get(marker);
    const index = Number.isInteger(delta.index) ? delta.index : slots.length;
    if (slots[index] !== undefined) return;
    slots[index] = delta.text || "";
    if (this.root.dataset.state !== "working") this.setStatus("working", "");
    this.scheduleRender();
  }

  text(marker) {
    return (this.parts.get(marker) || []).join("");
  }

  scheduleRender() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.render();
    });
  }

  render() {
    this.answer.innerHTML = renderMarkdown(this.text("answer"));
    // Channels other than the answer (thinking, or a bundle's own) fold away.
    const others = [...this.parts.keys()].filter((m) => m !== "answer");
    this.thinkingBox.hidden = others.length === 0;
    this.thinking.innerHTML = others
      .map((m) => (others.length > 1 ? `**${m}**\n\n` : "") + this.text(m))
      .map(renderMarkdown)
      .join("");
  }

  step(envelope) {
    const event = envelope.event || {};
    if (envelope.type === "chat.followups") {
      this.setFollowups(envelope.data?.followups || []);
      return;
    }
    const name = event.step || "step";
    const title =
      name === "artifact" && envelope.data?.name
        ? `Made the file ${envelope.data.name}`
        : event.title || name;
    let item = this.steps.get(name);
    if (!item) {
      item = element("li", "step");
      item.append(element("span", "step-icon"), element("span", "step-title"));
      this.steps.set(name, item);
      this.timeline.append(item);
    }
    const status = event.status || "running";
    item.dataset.status = status;
    item.querySelector(".step-icon").setAttribute("aria-label", status);
    // Keep the first title when a later update of the same step has none.
    if (event.title || !item.querySelector(".step-title").textContent) {
      item.querySelector(".step-title").textContent = title;
    }
    this.stepsBox.hidden = false;
    const running = [...this.steps.values()].some((s) => s.dataset.status === "running");
    this.stepsSummary.textContent = `Steps (${this.steps.size})${running ? " · working…" : ""}`;
    if (this.root.dataset.state === "waiting") this.setStatus("working", "");
  }

  setFollowups(suggestions) {
    this.followups.replaceChildren();
    if (suggestions.length === 0) {
      this.followups.hidden = true;
      return;
    }
    this.followups.append(element("span", "followups-label", "Suggestions"));
    for (const suggestion of suggestions) {
      const button = element("button", "chip followup", suggestion);
      button.type = "button";
      button.addEventListener("click", () => this.onFollowup(suggestion));
      this.followups.append(button);
    }
    this.followups.hidden = false;
  }

  complete(finalAnswer) {
    this.finished = true;
    if (typeof finalAnswer === "string" && (this.partial || this.text("answer") === "")) {
      this.parts.set("answer", [finalAnswer]);
    }
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.render();
    this.markStepsDone();
    this.setStatus("completed", "");
  }

  fail(data) {
    this.finished = true;
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.render();
    this.markStepsDone();
    const type = data?.error_type || "error";
    const label = ERROR_LABELS[type];
    let text;
    if (type === "cancelled" || type === "superseded" || type === "turn_interrupted") {
      text = label;
    } else {
      text = `${label || "Something went wrong"}: ${data?.error || type}`;
    }
    this.setStatus(type === "cancelled" ? "cancelled" : "failed", text);
  }

  // Steps still "running" when the turn ends did not finish.
  markStepsDone() {
    for (const item of this.steps.values()) {
      if (item.dataset.status === "running") item.dataset.status = "stopped";
    }
    this.stepsSummary.textContent = `Steps (${this.steps.size})`;
  }

  // A turn as the API lists it (GET /api/conversations/{id}).
  static fromRecord(record, onFollowup) {
    const view = new TurnView({ turnId: record.turn_id, prompt: record.prompt || "", onFollowup });
    view.setFiles(record.attachments || []);
    const state = record.state;
    if (state === "completed") {
      view.complete(record.final_answer || "");
    } else if (state === "queued" || state === "running") {
      view.partial = true;
      view.setStatus(state === "queued" ? "waiting" : "working", "Answering…");
    } else {
      view.fail({
        error_type: record.error_type || (state === "cancelled" ? "cancelled" : state),
        error: state,
      });
      if (record.final_answer) view.answer.innerHTML = renderMarkdown(record.final_answer);
    }
    return view;
  }
}

