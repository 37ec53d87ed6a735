// A small, safe subset of Markdown for answers that arrive piece by piece.
//
// Safety comes first and by construction: the whole source is HTML-escaped
// before any markup is made, so the only tags in the output are the ones
// written below, and a link is made only for http(s) URLs. The subset:
// fenced code blocks, inline code, **bold**, *italic* / _italic_, links
// [text](http...), bullet and numbered lists (one level), # headings,
// horizontal rules and paragraphs (single newlines become line breaks).
// Everything else (raw HTML, images, tables, nested lists, block quotes,
// reference links, bare URLs) stays plain text. An unclosed code fence runs to
// the end, which is what a half-streamed answer needs.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([A-Za-z0-9_+#.-]*)\s*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const BULLET = /^ {0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^ {0,3}(\d{1,9})[.)]\s+(.*)$/;

export function renderMarkdown(source) {
  // NUL marks placeholders in renderInline, so none may come from the source.
  const text = String(source).replace(/\r\n?/g, "\n").replace(/\u0000/g, "");
  const lines = escapeHtml(text).split("\n");
  const blocks = new BlockWriter();
  for (let i = 0; i < lines.length; i += 1) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    if (fence) {
      const code = [];
      i += 1;
      while (i < lines.length && !closesFence(lines[i], fence[1])) {
        code.push(lines[i]);
        i += 1;
      }
      blocks.code(code.join("\n"), fence[2]);
      continue;
    }

    const heading = HEADING.exec(line);
    const bullet = BULLET.exec(line);
    const numbered = NUMBERED.exec(line);
    if (line.trim() === "") {
      blocks.blank();
    } else if (heading) {
      blocks.heading(heading[1].length, heading[2]);
    } else if (RULE.test(line)) {
      blocks.rule();
    } else if (bullet) {
      blocks.item("ul", bullet[1]);
    } else if (numbered) {
      blocks.item("ol", numbered[2], Number(numbered[1]));
    } else {
      blocks.line(line);
    }
  }
  return blocks.finish();
}

function closesFence(line, opener) {
  const trimmed = line.trim();
  return trimmed.length >= opener.length && trimmed === opener[0].repeat(trimmed.length);
}

// Collects block-level HTML; open paragraphs and lists are closed by the next
// block of another kind or by a blank line.
class BlockWriter {
  constructor() {
    this.html = [];
    this.paragraph = [];
    this.list = null;
  }

  blank() {
    this.closeParagraph();
    this.closeList();
  }

  line(line) {
    // An indented line right after a list item continues that item.
    if (this.list && /^\s/.test(line)) {
      const items = this.list.items;
      items[items.length - 1] += "\n" + line.trim();
      return;
    }
    this.closeList();
    this.paragraph.push(line.trim());
  }

  heading(level, content) {
    this.blank();
    // Answers sit below the page's own h1 and h2, so their headings start at h3.
    const tag = `h${Math.min(6, level + 2)}`;
    this.html.push(`<${tag}>${renderInline(content)}</${tag}>`);
  }

  rule() {
    this.blank();
    this.html.push("<hr>");
  }

  code(code, lang) {
    this.blank();
    const label = lang ? ` data-lang="${lang}"` : "";
    this.html.push(`<pre${label}><code>${code}</code></pre>`);
  }

  item(tag, content, start) {
    this.closeParagraph();
    if (this.list && this.list.tag !== tag) this.closeList();
    if (!this.list) this.list = { tag, start, items: [] };
    this.list.items.push(content);
  }

  closeParagraph() {
    if (this.paragraph.length === 0) return;
    this.html.push(`<p>${this.paragraph.map(renderInline).join("<br>")}</p>`);
    this.paragraph = [];
  }

  closeList() {
    if (!this.list) return;
    const { tag, start, items } = this.list;
    const from = tag === "ol" && start !== 1 ? ` start="${start}"` : "";
    const body = items
      .map((item) => `<li>${item.split("\n").map(renderInline).join("<br>")}</li>`)
      .join("");
    this.html.push(`<${tag}${from}>${body}</${tag}>`);
    this.list = null;
  }

  finish() {
    this.blank();
    return this.html.join("\n");
  }
}

// Inline markup of one already-escaped line. Code spans and links are set
// aside first as NUL-numbered placeholders, so that emphasis never reaches
// inside them (an underscore in a URL must not become <em>).
function renderInline(text) {
  const saved = [];
  const keep = (html) => {
    saved.push(html);
    return `\u0000${saved.length - 1}\u0000`;
  };
  let out = text.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, __, code) =>
    keep(`<code>${code.trim()}</code>`),
  );
  out = out.replace(/\[([^\]]+)\]\((https?:\/\/[^\s()]+)\)/g, (_, label, href) =>
    keep(
      `<a href="${href}" target="_blank" rel="noopener noreferrer">${emphasis(label)}</a>`,
    ),
  );
  out = emphasis(out);
  return out.replace(/\u0000(\d+)\u0000/g, (_, n) => saved[Number(n)]);
}

function emphasis(text) {
  return text
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?![*\w])/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>");
}
