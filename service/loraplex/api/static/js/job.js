// One job: its facts, the training-loss and validation curves (polled while it runs, no reload),
// the evaluation that decided promotion, the latest events, and a cancel button.
import { get, post } from "./api.js";
import { el, facts, formatNumber, formatTime, replace, showError, table } from "./dom.js";
import uPlot from "../vendor/uplot/uPlot.esm.js";

const POLL_MS = 1000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export async function render(main, [jobId]) {
  const view = {
    summary: el("div", { id: "job-summary" }),
    chartStatus: el("p", { id: "curve-status", class: "note", "aria-live": "polite" }),
    chart: el("div", { class: "chart", id: "loss-chart", role: "img", "aria-label": "Training and validation loss by step" }),
    evaluation: el("section", { id: "job-evaluation", "aria-labelledby": "evaluation-title" }),
    events: el("section", { id: "job-events" }),
    plot: null,
  };
  replace(main, el("h1", {}, `Job ${jobId}`), view.summary, el("h2", {}, "Loss curves"), view.chartStatus, view.chart,
    view.evaluation, view.events);
  let timer = null;
  let stopped = false;
  const tick = async () => {
    let job = null;
    try {
      job = await refresh(jobId, view);
    } catch (err) {
      showError(err);
    }
    if (!stopped && !(job && TERMINAL.has(job.status))) timer = setTimeout(tick, POLL_MS);
  };
  await tick();
  return () => { stopped = true; clearTimeout(timer); if (view.plot) view.plot.destroy(); };
}

async function refresh(jobId, view) {
  const id = encodeURIComponent(jobId);
  const [job, report, events] = await Promise.all([get(`/v1/fine_tuning/jobs/${id}`),
    get(`/v1/fine_tuning/jobs/${id}/report`), get(`/v1/fine_tuning/jobs/${id}/events?limit=15`)]);
  renderSummary(job, view);
  drawCurves(report, view);
  renderEvaluation(job.evaluation, view.evaluation);
  replace(view.events, el("h2", {}, "Latest events"), table("Newest first", ["Time", "Level", "Message"],
    events.data.map((e) => [formatTime(e.created_at), e.level, e.message])));
  return job;
}

function renderSummary(job, view) {
  const hp = Object.entries(job.hyperparameters || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ");
  const pairs = [["Status", el("span", { id: "job-status", class: job.status === "failed" ? "bad" : "" }, job.status)],
    ["Suffix", job.user_provided_suffix || ""], ["Base model", job.model], ["Adapter", job.fine_tuned_model || "(not yet)"],
    ["Training file", job.training_file], ["Validation file", job.validation_file || "(held out from training)"],
    ["Hyperparameters", hp], ["Trained tokens", job.trained_tokens ?? ""], ["Created", formatTime(job.created_at)],
    ["Finished", formatTime(job.finished_at)]];
  if (job.error) pairs.push(["Error", el("span", { id: "job-error", class: "bad" }, `${job.error.message} (${job.error.code})`)]);
  const parts = [facts(pairs)];
  if (!TERMINAL.has(job.status)) {
    const cancel = el("button", { type: "button", id: "cancel-job" }, "Cancel job");
    cancel.addEventListener("click", async () => {
      try {
        await post(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/cancel`);
      } catch (err) {
        showError(err);
      }
    });
    parts.push(cancel);
  }
  const focused = view.summary.contains(document.activeElement) ? document.activeElement.id : null;
  replace(view.summary, ...parts);
  if (focused) document.getElementById(focused)?.focus(); // a poll never steals the keyboard focus
}

// uPlot wants one x array and aligned y arrays: training loss at every logged step, validation at epoch ends.
function alignedCurves(report) {
  const train = new Map(report.train_curve.map((p) => [p.step, p.train_loss]));
  const valid = new Map(report.valid_curve.map((p) => [p.step, p.valid_loss]));
  const steps = [...new Set([...train.keys(), ...valid.keys()])].sort((a, b) => a - b);
  return [steps, steps.map((s) => train.get(s) ?? null), steps.map((s) => valid.get(s) ?? null)];
}

function drawCurves(report, view) {
  const data = alignedCurves(report);
  view.chart.dataset.trainPoints = String(report.train_curve.length);
  view.chart.dataset.validPoints = String(report.valid_curve.length);
  view.chartStatus.textContent = `${report.train_curve.length} training-loss points, ${report.valid_curve.length} validation points`;
  if (report.train_curve.length === 0 && report.valid_curve.length === 0) return;
  if (!view.plot) {
    view.plot = new uPlot({
      width: Math.max(360, Math.min(1100, view.chart.clientWidth || 900)), height: 300,
      scales: { x: { time: false } },
      axes: [{ label: "optimizer step" }, { label: "loss (nats / token)" }],
      series: [{ label: "step" },
        { label: "train loss", stroke: "#1f5fa8", width: 1.5, spanGaps: true },
        { label: "validation loss", stroke: "#c2410c", width: 2, spanGaps: true, points: { show: true, size: 7 } }],
    }, data, view.chart);
  } else {
    view.plot.setData(data);
  }
}

// The evaluation record as the job stores it: the decision and the comparisons first (base, adapter and
// the incumbent it would replace), then every other field, so fields this page does not know still show.
const KNOWN = [["promoted", "Promoted"], ["reason", "Reason"], ["blocked_by", "Blocked by"],
  ["incumbent", "Incumbent (the version it would replace)"], ["gain", "Gain over the base (nats/token)"],
  ["gain_ci", "Gain over the base, confidence interval"], ["incumbent_gain", "Gain over the incumbent (nats/token)"],
  ["incumbent_gain_ci", "Gain over the incumbent, confidence interval"],
  ["forgetting_ratio", "Forgetting ratio (reference perplexity, adapter / base)"], ["max_forgetting_ratio", "Largest forgetting ratio allowed"]];
const COMPARED = [["valid_loss", "Validation loss"], ["valid_mean_token_accuracy", "Token accuracy"],
  ["valid_preference_accuracy", "Preference accuracy"], ["valid_reward_margin", "Reward margin"],
  ["reference_perplexity", "Reference-text perplexity"]];
const ROLES = ["base", "adapter", "incumbent"];

function renderEvaluation(evaluation, section) {
  if (!evaluation) {
    replace(section, el("h2", { id: "evaluation-title" }, "Evaluation"), el("p", { class: "note" }, "Not evaluated yet."));
    return;
  }
  const used = new Set();
  const take = (key) => { used.add(key); return evaluation[key]; };
  const decision = KNOWN.filter(([key]) => key in evaluation).map(([key, label]) => [label, formatValue(take(key))]);
  const rows = COMPARED.map(([metric, label]) => [label, ...ROLES.map((role) => {
    const key = metric === "reference_perplexity" ? `${metric}_${role}` : `${role}_${metric}`;
    return key in evaluation ? formatValue(take(key)) : "n/a";
  })]).filter((cells) => cells.slice(1).some((cell) => cell !== "n/a"));
  const others = Object.entries(evaluation).filter(([key]) => !used.has(key)).map(([key, value]) => [key, formatValue(value)]);
  const promoted = evaluation.promoted;
  replace(section, el("h2", { id: "evaluation-title" }, "Evaluation"),
    el("p", { id: "promotion-decision", class: promoted ? "ok" : "bad" },
      promoted === undefined ? "No promotion decision recorded." : promoted ? "Promoted" : "Not promoted"),
    facts(decision),
    table("Base model vs adapter vs incumbent", ["Metric", ...ROLES], rows),
    others.length ? el("details", {}, el("summary", {}, "Every other evaluation field"), facts(others)) : null);
}

function formatValue(value) {
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (Array.isArray(value)) return value.length ? `[${value.map((v) => formatValue(v)).join(", ")}]` : "none";
  if (value !== null && typeof value === "object") return JSON.stringify(value);
  return formatNumber(value);
}
