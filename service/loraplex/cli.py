"""`loraplex` command line: subcommands over one `Settings`.

Every `Settings` field is a flag with the same name (`--max-loras` <-> `LORAPLEX_MAX_LORAS`), accepted
before or after the subcommand. Precedence: flag > environment > default. A new subcommand is one entry
in `COMMANDS`.
"""
from __future__ import annotations

import argparse
import sys
import time
import types
import typing
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from pydantic import ValidationError

from loraplex.config import Settings

ENV_PREFIX = "LORAPLEX_"
GRACEFUL_SHUTDOWN_S = 5  # after the drain, uvicorn's own wait for connections to close


class Command(NamedTuple):
    help: str
    run: Callable[..., int]  # run(settings), or run(settings, args) when `arguments` adds its own
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


def serve(settings: Settings) -> int:
    """Run the HTTP API in this process (one uvicorn worker: the engine owns the model and the device)."""
    from loraplex.api.log_config import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    from loraplex.engine.errors import EngineError
    from loraplex.engine_factory import check_model

    try:
        check_model(settings)  # a setting the model cannot take: one clear line, not uvicorn's traceback
    except EngineError as exc:
        print(f"loraplex serve: {exc.message}", file=sys.stderr)
        return 2
    from loraplex.api.app import create_app  # heavy (torch, the engine): only when serving
    from loraplex.api.server import serve as serve_app

    serve_app(create_app(settings), settings, graceful_shutdown_s=GRACEFUL_SHUTDOWN_S)
    return 0


def worker(settings: Settings) -> int:
    """Train queued fine-tuning jobs in this process until SIGTERM."""
    from loraplex.training.worker import run_worker  # heavy (torch): only when training

    return run_worker(settings)


def jobs(settings: Settings, args: argparse.Namespace) -> int:
    url = args.url or f"http://{settings.host}:{settings.port}"
    if args.action == "report":
        return job_report(url, args.api_key, args.job_id, args.out)
    return watch_job(url, args.api_key, args.job_id)


def job_report(url: str, api_key: str | None, job_id: str, png_path: str | None, out=None) -> int:
    """Print the job's evaluation (base vs adapter, forgetting, promotion) and per-epoch validation;
    with `png_path`, also save the report PNG there. Exit status 2 when the API refuses."""
    import httpx

    out = out or sys.stdout
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        response = client.get(f"/v1/fine_tuning/jobs/{job_id}/report")
        if response.status_code == 200 and png_path:
            png = client.get(f"/v1/fine_tuning/jobs/{job_id}/report", params={"format": "png"})
            response = png if png.status_code != 200 else response
            if png.status_code == 200:
                Path(png_path).write_bytes(png.content)
    if response.status_code != 200:
        print(f"loraplex: {response.status_code} {response.text}", file=sys.stderr)
        return 2
    out.write(report_text(response.json()))
    if png_path:
        out.write(f"plot written to {png_path}\n")
    return 0


def report_text(report: dict) -> str:
    lines = [f"{report['fine_tuning_job_id']}  {report['status']}  {report.get('fine_tuned_model') or ''}"]
    for point in report["valid_curve"]:
        lines.append(f"  epoch {point['epoch']:>3}  step {point['step']:>6}  train {point['train_loss']:.4f}  "
                     f"valid {point['valid_loss']:.4f}  accuracy {point['valid_mean_token_accuracy']:.3f}")
    evaluation = report.get("evaluation")
    if evaluation:
        for label, base, adapter in (
            ("validation loss", evaluation["base_valid_loss"], evaluation["adapter_valid_loss"]),
            ("token accuracy", evaluation["base_valid_mean_token_accuracy"], evaluation["adapter_valid_mean_token_accuracy"]),
            ("reference perplexity", evaluation["reference_perplexity_base"], evaluation["reference_perplexity_adapter"]),
        ):
            if base is not None and adapter is not None:
                lines.append(f"  {label:<21} base {base:10.4f}   adapter {adapter:10.4f}")
        if evaluation.get("incumbent_valid_loss") is not None:
            lines.append(f"  incumbent {evaluation['incumbent']}: validation loss {evaluation['incumbent_valid_loss']:.4f}")
        lines.append(f"  {evaluation['reason']}")
    return "\n".join(lines) + "\n"


def watch_job(url: str, api_key: str | None, job_id: str, poll_s: float = 1.0, out=None) -> int:
    """Poll the HTTP API, redrawing one progress line (step/total, loss, status) until the job ends.
    Exit status: 0 succeeded, 1 failed or cancelled, 2 the API refused (unknown job, bad key...)."""
    import httpx

    out = out or sys.stdout
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        while True:
            job = client.get(f"/v1/fine_tuning/jobs/{job_id}")
            events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 50})
            if job.status_code != 200 or events.status_code != 200:
                failed = job if job.status_code != 200 else events
                print(f"\nloraplex: {failed.status_code} {failed.text}", file=sys.stderr)
                return 2
            job = job.json()
            metrics = next((e["data"] for e in events.json()["data"] if e.get("data")), None)
            out.write("\r" + progress_line(job, metrics))
            out.flush()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                detail = job["fine_tuned_model"] or (job.get("error") or {}).get("message") or ""
                out.write(f"\n{job['status']}: {detail}\n")
                return 0 if job["status"] == "succeeded" else 1
            time.sleep(poll_s)


def progress_line(job: dict, metrics: dict | None, width: int = 30) -> str:
    step, total = (metrics["step"], metrics["total_steps"]) if metrics else (0, 0)
    if job["status"] == "succeeded" and not metrics:
        step = total = 1
    filled = int(width * step / total) if total else 0
    loss = f"loss {metrics['train_loss']:.4f}" if metrics else "loss -"
    return f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total or '?'} {loss} {job['status']:<16}"


def _jobs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["watch", "report"],
                        help="watch: live progress of one job until it ends; report: its evaluation and curves")
    parser.add_argument("job_id", help="ftjob-...")
    parser.add_argument("--url", default=None, help="Server URL (default: http://<host>:<port> from settings).")
    parser.add_argument("--api-key", dest="api_key", default=None, help="Bearer key (default: none, dev mode).")
    parser.add_argument("--out", default=None, help="report: also save the PNG plot to this file.")


COMMANDS: dict[str, Command] = {
    "serve": Command("Serve the OpenAI-compatible HTTP API.", serve),
    "worker": Command("Run a fine-tuning worker: claim queued jobs, train, publish adapters.", worker),
    "jobs": Command("Fine-tuning jobs from the command line: `jobs watch <id>`, `jobs report <id> [--out plot.png]`.", jobs, _jobs_arguments),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        parser.error("invalid settings:\n" + _describe_errors(exc))
    command = COMMANDS[args.command]
    return command.run(settings, args) if command.arguments else command.run(settings)


def build_parser() -> argparse.ArgumentParser:
    settings_flags = _settings_parser()
    parser = argparse.ArgumentParser(
        prog="loraplex",
        description="One frozen base LLM, many per-tenant LoRA adapters, batched together.",
        epilog="Every option can also be set by its environment variable; a flag wins over the environment.",
        parents=[settings_flags],
        allow_abbrev=False,  # `jobs watch --api-key` must not read as an abbreviation of `--api-keys`
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help, parents=[settings_flags])
        if command.arguments:
            command.arguments(sub)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags given on the command line override the environment (pydantic-settings: init > env > default)."""
    given = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**given)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _settings_parser() -> argparse.ArgumentParser:
    # Defaults are SUPPRESS so an absent flag leaves no attribute and the environment can apply.
    parser = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    group = parser.add_argument_group("settings")
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} [{env_name(name)}; default: {default}]".replace("%", "%%")
        group.add_argument(flag_name(name), dest=name, help=help_text, **_value_spec(name, field.annotation))
    return parser


def _value_spec(name: str, annotation: Any) -> dict[str, Any]:
    """How argparse reads one field; pydantic does the real conversion and validation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # `X | None` -> X
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": [str(choice) for choice in typing.get_args(annotation)]}
    type_name = getattr(annotation, "__name__", "value")
    return {"metavar": type_name.upper() if type_name in ("int", "float", "Path") else name.upper()}


def _describe_errors(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        where = f"{flag_name(field)} / {env_name(field)}" if field else "settings"
        lines.append(f"  {where}: {error['msg']} (got {error.get('input')!r})")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
