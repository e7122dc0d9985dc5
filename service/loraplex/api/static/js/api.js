// The one door to the server: adds the bearer key, turns the OpenAI error envelope into an Error
// whose message is the API's own, and reads server-sent event streams.
const KEY_NAME = "loraplex.apiKey";
const API_ROOT = new URL(".", window.location.href); // the console lives at <root>/console

export const getKey = () => sessionStorage.getItem(KEY_NAME);
export const setKey = (key) => sessionStorage.setItem(KEY_NAME, key);
export const forgetKey = () => sessionStorage.removeItem(KEY_NAME);

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function apiUrl(path) {
  return new URL(path.replace(/^\//, ""), API_ROOT).href;
}

function headersFor(extra = {}) {
  const headers = new Headers(extra);
  const key = getKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return headers;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) ({ message, code } = body.error);
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(response.status, message, code);
}

async function send(method, path, { json, form, signal } = {}) {
  const init = { method, headers: headersFor(), signal, cache: "no-store" };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers.set("Content-Type", "application/json");
  } else if (form) {
    init.body = form;
  }
  let response;
  try {
    response = await fetch(apiUrl(path), init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `The server could not be reached (${err.message}).`);
  }
  if (!response.ok) throw await errorOf(response);
  const type = response.headers.get("content-type") || "";
  return /^application\/json\s*(;|$)/.test(type) ? response.json() : response.text();
}

export const get = (path, options) => send("GET", path, options);
export const post = (path, options) => send("POST", path, options);
export const del = (path, options) => send("DELETE", path, options);

// Every page of a list endpoint ({data, has_more}, `after` = last id), at most `maxPages` pages.
export async function listAll(path, { limit = 100, maxPages = 20, idOf = (item) => item.id } = {}) {
  const items = [];
  let after = null;
  for (let page = 0; page < maxPages; page += 1) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (after) query.set("after", after);
    const body = await get(`${path}?${query}`);
    items.push(...body.data);
    if (!body.has_more || body.data.length === 0) break;
    after = idOf(body.data[body.data.length - 1]);
  }
  return items;
}

// POST `json` and yield each `data:` chunk of the server-sent event stream until `[DONE]`.
export async function* stream(path, json, signal) {
  const headers = headersFor({ "Content-Type": "application/json", Accept: "text/event-stream" });
  const response = await fetch(apiUrl(path), { method: "POST", headers, body: JSON.stringify(json), signal });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(200, chunk.error.message, chunk.error.code);
        yield chunk;
      }
    }
  }
}
