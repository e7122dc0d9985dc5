"""The command line: every setting is a flag, flags beat the environment, `serve` hands off to uvicorn."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import loraplex
from loraplex import cli
from loraplex.config import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("LORAPLEX_"):
            monkeypatch.delenv(name)


def parse(*argv: str) -> Settings:
    return cli.settings_from_args(cli.build_parser().parse_args(argv))


def squash(text: str) -> str:
    """Help text is wrapped (even at hyphens): compare without whitespace."""
    return "".join(text.split())


def test_flags_become_typed_settings():
    settings = parse("serve", "--max-loras", "4", "--device", "cpu", "--data-dir", "/tmp/x", "--port", "9001")
    assert (settings.max_loras, settings.device, settings.data_dir, settings.port) == (4, "cpu", Path("/tmp/x"), 9001)
    assert settings.max_num_seqs == Settings.model_fields["max_num_seqs"].default


def test_flags_before_the_command_count_too():
    assert parse("--max-lora-rank", "32", "serve").max_lora_rank == 32


def test_flag_beats_env_and_env_beats_default(monkeypatch):
    monkeypatch.setenv("LORAPLEX_MAX_LORAS", "12")
    monkeypatch.setenv("LORAPLEX_PORT", "9100")
    settings = parse("serve", "--max-loras", "3")
    assert settings.max_loras == 3  # flag
    assert settings.port == 9100  # env
    assert settings.host == "127.0.0.1"  # default


def test_every_setting_has_a_flag_named_like_its_env_var():
    parser = cli.build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for name in Settings.model_fields:
        assert cli.flag_name(name) in flags
        assert cli.env_name(name) == "LORAPLEX_" + cli.flag_name(name)[2:].replace("-", "_").upper()


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"]])
def test_help_lists_every_setting_with_its_description(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    out = squash(capsys.readouterr().out)
    for name, field in Settings.model_fields.items():
        assert squash(cli.flag_name(name)) in out
        assert squash(cli.env_name(name)) in out
        assert squash(field.description) in out, name
    assert "serve" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--max-loras", "999"], "--max-loras / LORAPLEX_MAX_LORAS"),
        (["serve", "--port", "http"], "--port / LORAPLEX_PORT"),
        (["serve", "--device", "tpu"], "invalid choice"),
        ([], "required"),
        (["serve", "--no-such-flag"], "unrecognized"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_env_value_names_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("LORAPLEX_MAX_NUM_SEQS", "lots")
    with pytest.raises(SystemExit):
        cli.main(["serve"])
    assert "LORAPLEX_MAX_NUM_SEQS" in capsys.readouterr().err


def test_serve_runs_uvicorn_with_the_app(monkeypatch):
    built, ran = {}, {}
    fake_app_module = types.ModuleType("loraplex.api.app")
    fake_app_module.create_app = lambda settings: built.setdefault("app", ("app-for", settings))
    monkeypatch.setitem(sys.modules, "loraplex.api.app", fake_app_module)
    monkeypatch.setattr(
        "loraplex.api.server.serve", lambda app, settings, **kwargs: ran.update(app=app, settings=settings, **kwargs)
    )
    monkeypatch.setenv("LORAPLEX_HOST", "0.0.0.0")

    assert cli.main(["serve", "--port", "8123", "--log-level", "warning"]) == 0

    settings = built["app"][1]
    assert (settings.host, settings.port, settings.log_level) == ("0.0.0.0", 8123, "warning")
    assert ran["app"] is built["app"] and ran["settings"] is settings
    assert ran["graceful_shutdown_s"] == cli.GRACEFUL_SHUTDOWN_S > 0


def test_unknown_log_level_is_refused(monkeypatch):
    monkeypatch.setattr("loraplex.api.server.serve", lambda *a, **k: pytest.fail("must not start"))
    with pytest.raises(SystemExit, match="unknown log level"):
        cli.main(["serve", "--log-level", "chatty"])


def test_module_entry_point_prints_help():
    service_dir = Path(loraplex.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(service_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "loraplex", "serve", "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--max-loras" in result.stdout
