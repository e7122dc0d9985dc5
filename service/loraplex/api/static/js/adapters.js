// Adapters: the caller's own and the shared ones (the admin: every tenant's), upload by drag and drop,
// delete with a confirmation, copy the model id; the admin pins, evicts and switches the merge mode.
import { del, get, listAll, post } from "./api.js";
import { el, field, formatBytes, formatTime, replace, showError, table } from "./dom.js";

const ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"];

export async function render(main, _params, session) {
  const status = el("p", { role: "status", class: "note", id: "adapters-status" });
  const list = el("div", { id: "adapter-list" });
  const refresh = () => loadList(list, session);
  replace(main, el("h1", {}, "Adapters"), uploadForm(status, refresh), status, el("h2", {}, "Your adapters"), list);
  await refresh();
}

function uploadForm(status, refresh) {
  const picked = [];
  const name = el("input", { name: "name", autocomplete: "off", "aria-describedby": "upload-name-hint" });
  const input = el("input", { type: "file", multiple: true, accept: ".json,.safetensors,.zip,.tgz,.gz" });
  const chosen = el("p", { class: "note", id: "upload-chosen" }, "No files chosen.");
  const setFiles = (files) => {
    picked.splice(0, picked.length, ...files);
    chosen.textContent = picked.length ? `Chosen: ${picked.map((f) => f.name).join(", ")}` : "No files chosen.";
  };
  input.addEventListener("change", () => setFiles([...input.files]));
  const zone = el("div", { class: "drop", id: "drop-zone" },
    el("p", {}, "Drop a PEFT folder, its two files (adapter_config.json + adapter_model.safetensors) or one archive here, or choose files:"),
    ...field("upload-files", "Adapter files", input), chosen);
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    setFiles(await droppedFiles(event.dataTransfer));
  });
  const form = el("form", { class: "grid", id: "upload-form", "aria-label": "Upload an adapter" },
    ...field("upload-name", "Name", name),
    el("p", { class: "note full", id: "upload-name-hint" }, "Lower-case letters, digits, '.', '_' and '-'; a new upload under a name is its next version."),
    el("div", { class: "full" }, zone),
    el("div", { class: "full" }, el("button", { type: "submit" }, "Upload adapter")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(null);
    const files = [...picked]; // the server says what is wrong with a file, in its own words
    if (files.length === 0) {
      showError(new Error("Choose adapter_config.json + adapter_model.safetensors, or one archive."));
      return;
    }
    const body = new FormData();
    body.append("name", name.value.trim());
    for (const file of files) body.append("files", file, file.name);
    status.textContent = "Uploading...";
    try {
      const adapter = await post("/v1/adapters", { form: body });
      status.textContent = `Uploaded ${adapter.versioned_id} (sha256 ${adapter.sha256}).`;
      form.reset();
      setFiles([]);
      await refresh();
    } catch (err) {
      status.textContent = "";
      showError(err);
    }
  });
  return form;
}

// Files from a drop: plain files as they are; a dropped folder contributes its adapter files.
async function droppedFiles(transfer) {
  const entries = [...transfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
  if (!entries.some((entry) => entry.isDirectory)) return [...transfer.files];
  const files = [];
  for (const entry of entries) {
    if (entry.isFile) files.push(await new Promise((ok, fail) => entry.file(ok, fail)));
    if (entry.isDirectory) files.push(...await folderFiles(entry));
  }
  return files;
}

async function folderFiles(directory) {
  const children = await new Promise((ok, fail) => directory.createReader().readEntries(ok, fail));
  const wanted = children.filter((c) => c.isFile && ADAPTER_FILES.includes(c.name));
  return Promise.all(wanted.map((c) => new Promise((ok, fail) => c.file(ok, fail))));
}

async function loadList(container, session) {
  let adapters;
  try {
    adapters = await listAll("/v1/adapters", { idOf: (a) => a.id });
  } catch (err) {
    showError(err);
    return;
  }
  if (adapters.length === 0) {
    replace(container, el("p", {}, "No adapters yet."));
    return;
  }
  const admin = Boolean(session.me && session.me.is_admin);
  const headers = ["Model id", "Version", "Kind", "Rank", "Alpha", "Targets", "Size", "sha256", "Residency",
    "Merge mode", "Shared", "Created", "Actions"];
  const refresh = () => loadList(container, session);
  const rows = adapters.map((a) => [
    el("code", { class: "model-id" }, a.id), versionsCell(a), a.kind || "lora", String(a.rank), String(a.alpha),
    a.target_modules.join(", "), formatBytes(a.size_bytes), el("code", { class: "sha256" }, a.sha256),
    a.residency + (a.pinned ? " (pinned)" : ""), a.merge_mode, a.shared ? "yes" : "no", formatTime(a.created_at),
    actions(a, admin, refresh),
  ]);
  const caption = admin ? "Every tenant's adapters (latest versions) with their residency" : "Your adapters and the shared ones (latest versions)";
  replace(container, table(caption, headers, rows));
}

// The latest version, and a button that lists the earlier ones still stored (`<id>@<n>`).
function versionsCell(adapter) {
  const cell = el("div", {}, `v${adapter.version}`);
  if (adapter.version > 1) {
    const button = el("button", { type: "button", "aria-label": `Show versions of ${adapter.id}` }, "Versions");
    button.addEventListener("click", async () => {
      const lines = [];
      for (let v = adapter.version; v >= Math.max(1, adapter.version - 19); v -= 1) {
        try {
          const old = await get(`/v1/adapters/${adapter.id}@${v}`);
          lines.push(el("li", {}, `@${v}: ${old.sha256.slice(0, 12)}..., ${formatTime(old.created_at)}`));
        } catch (err) {
          lines.push(el("li", {}, `@${v}: ${err.message}`));
        }
      }
      button.replaceWith(el("ul", {}, lines));
    });
    cell.append(" ", button);
  }
  return cell;
}

function actions(adapter, admin, refresh) {
  const box = el("div", { class: "actions" });
  const copy = el("button", { type: "button", "aria-label": `Copy model id ${adapter.id}` }, "Copy id");
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(adapter.id);
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Copy failed: select the id";
    }
  });
  box.append(copy, " ", deleteControl(adapter, refresh));
  if (admin) box.append(" ", adminControls(adapter, refresh));
  return box;
}

// Delete asks in the page (no browser dialog): a second button confirms, another keeps the adapter.
function deleteControl(adapter, refresh) {
  const holder = el("span");
  const ask = el("button", { type: "button", "aria-label": `Delete ${adapter.id}` }, "Delete");
  ask.addEventListener("click", () => {
    const confirmButton = el("button", { type: "button", class: "bad" }, `Delete ${adapter.id} and all its versions`);
    const keep = el("button", { type: "button" }, "Keep it");
    confirmButton.addEventListener("click", async () => {
      try {
        await del(`/v1/adapters/${adapter.id}`);
        await refresh();
      } catch (err) {
        showError(err);
      }
    });
    keep.addEventListener("click", () => { replace(holder, ask); ask.focus(); });
    replace(holder, el("span", { role: "group", "aria-label": "Confirm delete" }, confirmButton, " ", keep));
    confirmButton.focus();
  });
  return replace(holder, ask);
}

function adminControls(adapter, refresh) {
  const run = (path, json) => async () => {
    try {
      await post(`/v1/adapters/${adapter.id}/${path}`, json ? { json } : {});
      await refresh();
    } catch (err) {
      showError(err);
    }
  };
  const pin = el("button", { type: "button" }, adapter.pinned ? "Unpin" : "Pin");
  pin.addEventListener("click", run(adapter.pinned ? "unpin" : "pin"));
  const evict = el("button", { type: "button" }, "Evict");
  evict.addEventListener("click", run("evict"));
  const mode = el("select", { "aria-label": `Merge mode of ${adapter.id}` },
    ["unmerged", "merged", "auto"].map((m) => el("option", { value: m, selected: m === adapter.merge_mode }, m)));
  mode.addEventListener("change", () => run("mode", { mode: mode.value })());
  return el("span", { role: "group", "aria-label": `Admin actions for ${adapter.id}` }, pin, " ", evict, " ", mode);
}
