// Playground: one prompt to two models side by side, streamed token by token, with the exact request
// shown as curl and as an `openai` snippet (the key appears there as a variable, never in clear).
import { apiUrl, get, stream } from "./api.js";
import { el, field, replace, showError } from "./dom.js";

export async function render(main) {
  const models = (await get("/v1/models")).data.map((m) => m.id);
  // A model id typed or picked: the base, an adapter, or one version of it (`<tenant>/<name>@<n>`).
  const choices = el("datalist", { id: "model-choices" }, models.map((m) => el("option", { value: m })));
  const pick = (id, index) => el("input", { id, list: "model-choices", autocomplete: "off", spellcheck: "false",
    value: models[Math.min(index, models.length - 1)] });
  const left = pick("model-a", 0);
  const right = pick("model-b", 1);
  const prompt = el("textarea", { rows: 4, cols: 60 }, "Review: The staff were friendly.\nSentiment:");
  const temperature = el("input", { type: "number", step: "any", value: "0" });
  const maxTokens = el("input", { type: "number", step: 1, value: "16" });
  const outputs = [left, right].map((_, i) => el("output", { class: "completion", id: `completion-${i}`, "aria-live": "off" }));
  const snippets = el("section", { id: "snippets", "aria-label": "The request as code" });
  const requestFor = (model) => ({ model, prompt: prompt.value, max_tokens: Number(maxTokens.value),
    temperature: Number(temperature.value), stream: true });
  const showSnippets = () => replace(snippets, el("h2", {}, "The same request in code"),
    el("pre", { class: "snippet", id: "curl-snippet" }, curlOf(requestFor(left.value))),
    el("pre", { class: "snippet", id: "openai-snippet" }, openaiOf(requestFor(left.value))));
  const form = el("form", { class: "grid", id: "playground-form", "aria-label": "Playground" },
    ...field("pg-prompt", "Prompt", prompt), ...field("pg-temperature", "Temperature", temperature),
    ...field("pg-max-tokens", "Max tokens", maxTokens),
    el("div", { class: "full" }, el("button", { type: "submit" }, "Run both")));
  let controller = null;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(null);
    if (controller) controller.abort();
    controller = new AbortController();
    showSnippets();
    await Promise.all([left, right].map((select, i) => runInto(outputs[i], requestFor(select.value), controller.signal)));
  });
  for (const control of [left, right, prompt, temperature, maxTokens]) control.addEventListener("change", showSnippets);
  const column = (select, output, label) => el("section", { "aria-label": label },
    el("label", { for: select.id }, label), " ", select, el("h2", {}, "Completion"), output);
  replace(main, el("h1", {}, "Playground"), choices, form,
    el("div", { class: "side-by-side" }, column(left, outputs[0], "Left model"), column(right, outputs[1], "Right model")),
    snippets);
  showSnippets();
  return () => controller && controller.abort();
}

async function runInto(output, request, signal) {
  output.textContent = "";
  output.setAttribute("aria-busy", "true");
  output.dataset.done = "false";
  try {
    for await (const chunk of stream("/v1/completions", request, signal)) {
      for (const choice of chunk.choices || []) output.append(choice.text || "");
    }
  } catch (err) {
    if (err.name !== "AbortError") showError(err);
  } finally {
    output.normalize();
    output.setAttribute("aria-busy", "false");
    output.dataset.done = "true";
  }
}

const quote = (text) => `'${text.replace(/'/g, "'\\''")}'`;

function curlOf(request) {
  return [`curl -N ${quote(apiUrl("/v1/completions"))} \\`, `  -H "Authorization: Bearer $LORAPLEX_API_KEY" \\`,
    `  -H 'Content-Type: application/json' \\`, `  -d ${quote(JSON.stringify(request))}`].join("\n");
}

function openaiOf(request) {
  return ["import os", "from openai import OpenAI", "",
    `client = OpenAI(base_url=${JSON.stringify(apiUrl("/v1"))}, api_key=os.environ["LORAPLEX_API_KEY"])`,
    `for chunk in client.completions.create(model=${JSON.stringify(request.model)}, prompt=${JSON.stringify(request.prompt)},`,
    `                                       max_tokens=${request.max_tokens}, temperature=${request.temperature}, stream=True):`,
    `    print(chunk.choices[0].text, end="", flush=True)`].join("\n");
}
