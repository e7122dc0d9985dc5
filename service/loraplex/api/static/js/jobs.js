// Training jobs: the list with status, and a form that uploads a JSONL file and starts a job.
import { del, get, listAll, post } from "./api.js";
import { el, field, formatTime, hashLink, replace, showError, table } from "./dom.js";

const PRESETS = [["", "server default (every projection)"], ["all", "all"], ["attention", "attention"], ["mlp", "mlp"]];

export async function render(main) {
  const list = el("div", { id: "job-list" });
  const files = el("div", { id: "file-list" });
  replace(main, el("h1", {}, "Training jobs"), await jobForm(), el("h2", {}, "Jobs"), list,
    el("h2", {}, "Training files"), files);
  await Promise.all([loadList(list), loadFiles(files)]);
}

async function loadFiles(container) {
  try {
    const files = (await get("/v1/files")).data;
    const rows = files.map((f) => [el("code", {}, f.id), f.filename, String(f.bytes), f.purpose, formatTime(f.created_at),
      previewButton(f)]);
    replace(container, files.length
      ? table("Your uploaded files", ["File", "Name", "Bytes", "Purpose", "Created", "Content"], rows)
      : el("p", {}, "No files yet."));
  } catch (err) {
    showError(err);
  }
}

// The first lines of a file, as text.
function previewButton(file) {
  const button = el("button", { type: "button", "aria-label": `Show the first lines of ${file.filename}` }, "First lines");
  button.addEventListener("click", async () => {
    try {
      const text = await get(`/v1/files/${encodeURIComponent(file.id)}/content`);
      const lines = (typeof text === "string" ? text : JSON.stringify(text)).split("\n").slice(0, 10).join("\n");
      button.replaceWith(el("pre", { class: "snippet file-preview" }, lines));
    } catch (err) {
      showError(err);
    }
  });
  return button;
}

async function loadList(container) {
  try {
    const jobs = await listAll("/v1/fine_tuning/jobs");
    const rows = jobs.map((job) => [hashLink(["jobs", job.id], job.id), job.user_provided_suffix || "", job.status,
      job.model, job.fine_tuned_model || "", formatTime(job.created_at), formatTime(job.finished_at)]);
    replace(container, jobs.length
      ? table("Your fine-tuning jobs, newest first", ["Job", "Suffix", "Status", "Base model", "Adapter", "Created", "Finished"], rows)
      : el("p", {}, "No jobs yet."));
  } catch (err) {
    showError(err);
  }
}

// No min/max here: the server checks every value and its message is the one shown.
const number = (attrs) => el("input", { type: "number", step: "any", ...attrs });

async function jobForm() {
  const models = await get("/v1/models");
  const model = el("select", {}, models.data.filter((m) => !m.id.includes("/")).map((m) => el("option", { value: m.id }, m.id)));
  const training = el("input", { type: "file", accept: ".jsonl,application/jsonl" });
  const validation = el("input", { type: "file", accept: ".jsonl,application/jsonl" });
  const suffix = el("input", { maxlength: 40, autocomplete: "off" });
  const epochs = number({ placeholder: "auto" });
  const lr = number({ placeholder: "auto" });
  const batch = number({ placeholder: "auto" });
  const rank = number({ placeholder: "8" });
  const preset = el("select", {}, PRESETS.map(([value, text]) => el("option", { value }, text)));
  const split = number({ placeholder: "0.1" });
  const patience = number({ placeholder: "3" });
  const force = el("input", { type: "checkbox" });
  const status = el("p", { role: "status", class: "note", id: "job-form-status" });
  const form = el("form", { class: "grid", id: "job-form", "aria-label": "Start a fine-tuning job" },
    ...field("job-model", "Base model", model), ...field("job-training-file", "Training file (JSONL)", training),
    ...field("job-validation-file", "Validation file (optional)", validation), ...field("job-suffix", "Adapter name (suffix)", suffix),
    ...field("job-epochs", "Epochs", epochs), ...field("job-lr", "Learning rate multiplier", lr),
    ...field("job-batch", "Batch size", batch), ...field("job-rank", "LoRA rank", rank),
    ...field("job-targets", "Target modules", preset), ...field("job-split", "Validation split", split),
    ...field("job-patience", "Early stopping patience (epochs, 0 = off)", patience),
    ...field("job-force", "Promote even if not better than the base", force),
    el("div", { class: "full" }, el("button", { type: "submit" }, "Upload and start job")), el("div", { class: "full" }, status));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(null);
    const hyperparameters = {};
    const put = (name, input, parse) => { if (input.value !== "") hyperparameters[name] = parse(input.value); };
    put("n_epochs", epochs, Number); put("learning_rate_multiplier", lr, Number); put("batch_size", batch, Number);
    put("lora_r", rank, Number); put("target_modules", preset, String); put("validation_split", split, Number);
    put("early_stopping_patience", patience, Number);
    const body = { model: model.value, method: { type: "supervised", supervised: { hyperparameters } } };
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    if (force.checked) body.force_promotion = true;
    const job = await startJob(body, training.files[0], validation.files[0], status);
    if (job) window.location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
  });
  return form;
}

// Upload the file(s), then create the job; if the job is refused the uploads are deleted again,
// so a failed start leaves nothing behind.
async function startJob(body, trainingFile, validationFile, status) {
  if (!trainingFile) {
    showError(new Error("Choose a training file (JSONL)."));
    return null;
  }
  const uploaded = [];
  try {
    status.textContent = `Uploading ${trainingFile.name}...`;
    uploaded.push(await uploadFile(trainingFile));
    body.training_file = uploaded[0].id;
    if (validationFile) {
      status.textContent = `Uploading ${validationFile.name}...`;
      uploaded.push(await uploadFile(validationFile));
      body.validation_file = uploaded[1].id;
    }
    status.textContent = "Starting the job...";
    return await post("/v1/fine_tuning/jobs", { json: body });
  } catch (err) {
    status.textContent = "";
    showError(err);
    for (const file of uploaded) await del(`/v1/files/${file.id}`).catch(() => {});
    return null;
  }
}

function uploadFile(file) {
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  return post("/v1/files", { form });
}
