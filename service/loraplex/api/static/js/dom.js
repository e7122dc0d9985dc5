// DOM helpers: every piece of data goes in as text (textContent / text nodes), never as markup.

// el("td", {class: "mono"}, "text", childNode, ...): attributes are set as strings; `on<event>` adds a listener.
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child)); // a string becomes a text node
  }
}

export function replace(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

// A table with a caption (for screen readers), header cells and rows of cells (text or nodes).
export function table(caption, headers, rows) {
  return el("table", {},
    el("caption", { class: "note" }, caption),
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))));
}

// <dl> of [term, value] pairs; values are text or nodes.
export function facts(pairs) {
  return el("dl", { class: "facts" }, pairs.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
}

export function field(id, label, control) {
  control.id = id;
  return [el("label", { for: id }, label), control];
}

export const hashLink = (parts, text) => el("a", { href: "#/" + parts.map(encodeURIComponent).join("/") }, text);

export function formatBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export const formatTime = (seconds) => (seconds ? new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) : "");

export function formatNumber(value, digits = 4) {
  if (value === null || value === undefined) return "n/a";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits);
  return String(value);
}

// The page-wide error region (role=alert): the API's message, or nothing.
export function showError(err) {
  const message = err ? (err.message || String(err)) : "";
  document.getElementById("error").textContent = message;
}
