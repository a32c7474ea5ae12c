// Model output as HTML: marked renders the markdown, DOMPurify removes anything that could
// run (scripts, event handlers, javascript: URLs, forms, frames), and links open elsewhere.
import { Marked } from "/app/vendor/marked.esm.js";
import DOMPurify from "/app/vendor/purify.esm.js";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

// Raw HTML in a reply is shown as the text it is, never as markup (DOMPurify is the second
// line: it strips whatever markdown itself could make that runs).
const marked = new Marked({
  gfm: true,
  breaks: true,
  renderer: {
    html({ text }) {
      return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
    },
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

const PURIFY = {
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "object", "embed"],
  FORBID_ATTR: ["style"],
  ALLOW_DATA_ATTR: false,
};

export function renderMarkdown(element, text) {
  const html = marked.parse(text || "", { async: false });
  element.innerHTML = DOMPurify.sanitize(html, PURIFY);
  for (const pre of element.querySelectorAll("pre")) {
    const copy = document.createElement("button");
    copy.className = "copy-code ghost";
    copy.type = "button";
    copy.textContent = "Copy";
    copy.addEventListener("click", () => {
      navigator.clipboard?.writeText(pre.querySelector("code")?.textContent || pre.textContent);
      copy.textContent = "Copied";
      setTimeout(() => (copy.textContent = "Copy"), 1200);
    });
    pre.appendChild(copy);
  }
}
