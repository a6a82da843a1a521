"""The command line in process: flags built from the settings, grouped help, one-line errors."""

from __future__ import annotations

import re

import pytest

from service import cli
from service.config import GROUPS, Settings


def help_text() -> str:
    return cli.build_parser().format_help()


def test_every_setting_declares_a_help_group():
    """A new setting says where ``--help`` lists it: ``json_schema_extra=group("limits")``."""
    undeclared = [name for name, field in Settings.model_fields.items()
                  if not isinstance(extra := field.json_schema_extra, dict) or extra.get("group") not in GROUPS]
    assert not undeclared, f"settings without a group (service.config.group): {undeclared}"


def test_help_is_grouped_with_host_and_port_first_and_readable_metavars():
    text = help_text()
    headings = [text.index(f"\n{name}:\n") for name in GROUPS]
    assert headings == sorted(headings), "the groups in GROUPS' order"
    server = text[headings[0]:headings[1]]
    assert server.index("--host HOST") < server.index("--port PORT") < server.index("--workers")
    for metavar in ("--store PATH", "--api-key KEY", "--batch-timeout-ms MS", "--max-batch-size N",
                    "--accelerator auto|cpu|cuda", "--request-timeout-s SECONDS", "--model-version N"):
        assert metavar in text, metavar
    assert not re.findall(r"--[\w-]+ (?:SecretStr|Path|str|int|float)\b", text)


@pytest.mark.parametrize(("argv", "says"), [
    (["--max-batchsize", "8"], "unrecognized argument --max-batchsize; did you mean --max-batch-size? (see --help)"),
    (["--max-batchsize=8"], "unrecognized argument --max-batchsize; did you mean --max-batch-size? (see --help)"),
    (["--prot", "9000"], "unrecognized argument --prot; did you mean --port? (see --help)"),
    (["--frobnicate"], "unrecognized argument --frobnicate (see --help)"),
    (["8000"], "unexpected argument '8000'"),
    (["--port"], "argument --port: expected one argument (see --help)"),
])
def test_a_command_line_mistake_is_one_line_with_a_suggestion(argv, says):
    with pytest.raises(cli.CliError) as bad:
        cli.parse(argv)
    assert str(bad.value).startswith(says) and "\n" not in str(bad.value), str(bad.value)
    assert str(bad.value).count("error") == 0


def test_flags_win_over_the_environment_which_wins_over_defaults(monkeypatch):
    monkeypatch.setenv("DIGITSERVE_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("DIGITSERVE_MODEL_VERSION", "3")
    assert cli.parse([]).max_batch_size == 16 and cli.parse([]).model_version == 3
    assert cli.parse(["--max-batch-size", "8"]).max_batch_size == 8
    assert cli.parse(["--model-version", "1"]).model_version == 1
    monkeypatch.delenv("DIGITSERVE_MAX_BATCH_SIZE")
    assert cli.parse([]).max_batch_size == Settings.model_fields["max_batch_size"].default


def test_a_host_name_is_accepted_and_bound_as_its_address():
    settings = cli.parse(["--host", "localhost"])
    assert settings.host == "localhost" and settings.bind_address() == "127.0.0.1"
    assert cli.parse(["--host", "::"]).bind_address() == "::"


def test_version_is_the_programs(capsys):
    with pytest.raises(SystemExit) as done:
        cli.parse(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip().startswith("digitserve 0.")
