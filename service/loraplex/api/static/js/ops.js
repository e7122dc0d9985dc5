// Operations glance (admin): queue depth, running sequences, tokens/s, KV use and adapters per tier,
// read from the Prometheus text at /metrics (with the admin key) and from the admin's adapter list.
// Where /metrics is not reachable from here (another port, another policy) the page says so.
import { get, listAll } from "./api.js";
import { el, formatNumber, replace, showError, table } from "./dom.js";

const POLL_MS = 2000;

export async function render(main, _params, session) {
  if (!(session.me && session.me.is_admin)) {
    replace(main, el("h1", {}, "Operations"), el("p", {}, "This view is for the admin key."));
    return null;
  }
  const tiles = el("div", { class: "tiles", id: "ops-tiles" });
  const tiers = el("div", { id: "ops-tiers" });
  const note = el("p", { class: "note", id: "ops-note", role: "status" });
  replace(main, el("h1", {}, "Operations"), tiles, note, el("h2", {}, "Adapters per tier"), tiers);
  let previous = null;
  let timer = null;
  const tick = async () => {
    previous = await refreshMetrics(tiles, note, previous);
    await refreshTiers(tiers);
    timer = setTimeout(tick, POLL_MS);
  };
  await tick();
  return () => clearTimeout(timer);
}

// `name{labels} value` lines -> Map(name -> sum of its samples); comments skipped.
export function parseMetrics(text) {
  const values = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([^\s{]+)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    values.set(match[1], (values.get(match[1]) || 0) + Number(match[3]));
  }
  return values;
}

async function refreshMetrics(tiles, note, previous) {
  let metrics;
  try {
    metrics = parseMetrics(await get("/metrics"));
  } catch (err) {
    note.textContent = `Metrics are not readable from the console (${err.message}); the tiers below come from the adapter list.`;
    replace(tiles);
    return null;
  }
  const now = { time: performance.now(), tokens: metrics.get("loraplex_generation_tokens_total") };
  const rate = previous && now.tokens !== undefined
    ? (now.tokens - previous.tokens) / ((now.time - previous.time) / 1000) : null;
  const tile = (label, value, id) => el("div", { class: "tile", id }, el("div", {}, label), el("div", { class: "value" }, value));
  const kv = metrics.get("loraplex_kv_cache_usage");
  replace(tiles,
    tile("Queue depth", formatNumber(metrics.get("loraplex_num_requests_waiting")), "ops-queue"),
    tile("Running sequences", formatNumber(metrics.get("loraplex_num_requests_running")), "ops-running"),
    tile("Tokens / s", rate === null ? "measuring..." : rate.toFixed(1), "ops-tokens"),
    tile("KV cache in use", kv === undefined ? "n/a" : `${(kv * 100).toFixed(1)} %`, "ops-kv"),
    tile("Device slots used", `${formatNumber(metrics.get("loraplex_adapters_resident"))} / ${formatNumber(metrics.get("loraplex_adapter_slots"))}`, "ops-slots"));
  note.textContent = "From /metrics, refreshed every 2 s.";
  return now;
}

async function refreshTiers(container) {
  try {
    const adapters = await listAll("/v1/adapters");
    const counts = new Map();
    for (const a of adapters) counts.set(a.residency, (counts.get(a.residency) || 0) + 1);
    const order = ["merged", "device", "loading", "host", "storage"];
    replace(container, adapters.length === 0 ? el("p", {}, "No adapters.")
      : table("Adapters (latest versions, every tenant) by where they are held", ["Tier", "Adapters"],
        order.filter((t) => counts.has(t)).map((t) => [t, String(counts.get(t))])));
  } catch (err) {
    showError(err);
  }
}
