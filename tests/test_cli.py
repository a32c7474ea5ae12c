"""The command line without a server, or with one that is not there: clear messages and exit
statuses, never a traceback (``mlxserve.cli``)."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest

from mlxserve import cli
from tests.conftest import GGUF_KEY, free_port


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("MLXSERVE_HOME", str(home))
    monkeypatch.setenv("MLXSERVE_PORT", str(free_port()))
    monkeypatch.delenv("MLXSERVE_HOST", raising=False)
    monkeypatch.delenv("MLXSERVE_API_TOKEN", raising=False)
    monkeypatch.delenv("MLXSERVE_MODELS_DIR", raising=False)
    return home


@pytest.mark.parametrize(
    "argv",
    [
        ["ps"],
        ["ps", "--json"],
        ["load", "a/b"],
        ["unload", "--all"],
        ["get", "a/b"],
        ["chat", "a/b"],
        ["log", "stream"],
    ],
)
def test_no_server_is_a_clear_error(argv, capsys):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "No mlxserve server is running at http://127.0.0.1:" in err
    assert "mlxserve server start" in err
    assert "Traceback" not in err


def test_server_status_and_stop_without_a_server(capsys):
    assert cli.main(["server", "status"]) == 1
    assert "not running" in capsys.readouterr().out
    assert cli.main(["server", "status", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "stopped"
    assert cli.main(["server", "stop"]) == 1
    assert "No server is running." in capsys.readouterr().out


def test_bad_arguments_are_refused_before_anything_starts(home, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["server", "start", "--no-such-flag"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert not (home / "server.json").exists()
    with pytest.raises(SystemExit) as exc:
        cli.main(["ps", "--models-dir", "/x"])
    assert exc.value.code == 2


def test_unload_needs_a_target(capsys):
    assert cli.main(["unload"]) == 2
    assert "--all" in capsys.readouterr().err


def test_load_refuses_partial_gpu_offload(capsys):
    assert cli.main(["load", "a/b", "--gpu", "0.5"]) == 2
    assert "--gpu" in capsys.readouterr().err


def test_ls_and_rm(models_root, tmp_path, capsys, monkeypatch):
    models = tmp_path / "models"
    source = models_root / GGUF_KEY
    target = models / GGUF_KEY
    target.mkdir(parents=True)
    for f in source.iterdir():
        try:
            os.link(f, target / f.name)
        except OSError:
            shutil.copy(f, target / f.name)
    assert cli.main(["ls", "--models-dir", str(models)]) == 0
    out = capsys.readouterr().out
    assert GGUF_KEY in out and "gguf" in out and "1 model" in out
    assert cli.main(["ls", "--models-dir", str(models), "--json"]) == 0
    assert [m["key"] for m in json.loads(capsys.readouterr().out)] == [GGUF_KEY]
    # Not a terminal and no --yes: nothing is deleted.
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert cli.main(["rm", GGUF_KEY, "--models-dir", str(models)]) == 2
    assert target.is_dir()
    assert cli.main(["rm", "nothing/here", "--models-dir", str(models), "--yes"]) == 1
    assert "names no model" in capsys.readouterr().err
    assert cli.main(["rm", GGUF_KEY, "--models-dir", str(models), "--yes"]) == 0
    assert f"Deleted {GGUF_KEY}." in capsys.readouterr().out
    assert not target.exists() and not target.parent.exists()
    assert cli.main(["ls", "--models-dir", str(models)]) == 0
    assert "No models in" in capsys.readouterr().out


def test_tuning_settings_have_flags_and_bad_values_are_one_line(capsys):
    parser = cli.build_parser()
    args, _ = parser.parse_known_args(
        ["serve", "--max-batch-size", "4", "--prefill-chunk", "64", "--mcp-call-timeout", "2.5"]
    )
    settings = cli._settings(args)
    assert (settings.max_batch_size, settings.prefill_chunk) == (4, 64)
    assert settings.mcp_call_timeout == 2.5
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    shown = capsys.readouterr().out
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    # Derived from Settings: every numeric setting has a flag, with its variable in the help.
    from mlxserve.settings import Settings

    dests = {a.dest for a in serve._actions}
    numeric = [n for n, f in Settings.model_fields.items() if f.annotation in (int, float)]
    assert numeric and all(n in dests for n in numeric)
    for name in ("max_batch_size", "prefill_chunk", "cache_reuse", "prompt_cache_disk_bytes"):
        assert f"--{name.replace('_', '-')}" in shown and f"MLXSERVE_{name.upper()}" in shown
    assert cli.main(["serve", "--max-batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-batch-size:") and "Traceback" not in err
