// The console shell: the key form, who the key is, and the router from URL fragments to views.
// Each view module exports `render(main, params, session)` and may return a cleanup function.
import { forgetKey, get, getKey, setKey } from "./api.js";
import { el, replace, showError } from "./dom.js";
import * as adapters from "./adapters.js";
import * as jobs from "./jobs.js";
import * as job from "./job.js";
import * as playground from "./playground.js";
import * as ops from "./ops.js";

const ROUTES = [
  [/^#\/adapters$/, adapters],
  [/^#\/jobs$/, jobs],
  [/^#\/jobs\/([^/]+)$/, job],
  [/^#\/playground$/, playground],
  [/^#\/ops$/, ops],
];

const session = { me: null };
let cleanup = null;

function routeOf(hash) {
  for (const [pattern, view] of ROUTES) {
    const match = pattern.exec(hash);
    if (match) return { view, params: match.slice(1).map(decodeURIComponent) };
  }
  return null;
}

async function whoAmI() {
  session.me = null;
  const whoami = document.getElementById("whoami");
  if (!getKey()) {
    whoami.textContent = "No key: type your API key to start.";
    return;
  }
  try {
    session.me = await get("/v1/me");
    whoami.textContent = session.me.is_admin ? "Signed in as the admin" : `Signed in as tenant ${session.me.tenant}`;
  } catch (err) {
    whoami.textContent = "";
    showError(err);
    if (err.status === 401) forgetKey();
  }
  document.getElementById("nav-ops").hidden = !(session.me && session.me.is_admin);
  document.getElementById("forget-key").hidden = !getKey();
}

async function show() {
  if (cleanup) cleanup();
  cleanup = null;
  if (!routeOf(window.location.hash)) {
    window.location.replace("#/adapters");
    return;
  }
  const { view, params } = routeOf(window.location.hash);
  const main = document.getElementById("view");
  for (const link of document.querySelectorAll("nav a")) {
    const current = window.location.hash.startsWith(link.getAttribute("href"));
    if (current) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  if (!session.me) {
    replace(main, el("h1", {}, "loraplex console"),
      el("p", {}, "Type a tenant's API key (or the admin key) above. It stays in this tab only."));
    return;
  }
  replace(main);
  try {
    cleanup = (await view.render(main, params, session)) || null;
  } catch (err) {
    showError(err);
  }
}

function start() {
  document.getElementById("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("key-input");
    const key = input.value.trim();
    input.value = "";
    showError(null);
    if (!key) return;
    setKey(key);
    await whoAmI();
    await show();
    document.getElementById("view").focus();
  });
  document.getElementById("forget-key").addEventListener("click", async () => {
    forgetKey();
    showError(null);
    await whoAmI();
    await show();
  });
  window.addEventListener("hashchange", () => { showError(null); show(); });
  whoAmI().then(show);
}

start();
