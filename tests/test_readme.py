"""The README's set-up commands are what CI runs: keep them from drifting apart."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[:2]


def test_ci_runs_the_readme_test_command():
    run_cmd, test_cmd = readme_commands()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_cmd in ci_lines
    assert "pytest" in test_cmd and "fedlodrop run" in run_cmd
    # and again on the CPU path the hardware did not take (issue 25: bf16 on AMX CPUs, fp32 elsewhere)
    assert test_cmd.endswith("python -m pytest -q -m precision --cpu-path other")


def test_both_commands_install_torch_first():
    for cmd in readme_commands():
        steps = cmd.split("&&")
        first_pip = next(i for i, s in enumerate(steps) if "pip install" in s)
        assert "torch==" in steps[first_pip]


def test_the_readme_is_short_and_its_links_resolve():
    """Issue 28: a user finds set-up and the commands at once; the rest lives in docs/."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not link.startswith("http")]
    assert local, "the README points to docs/"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


def test_every_command_the_readme_shows_parses():
    """Each `fedlodrop ...` the README quotes names a real command and real options (click refuses
    an unknown option or command before it honours --help)."""
    import shlex

    from typer.testing import CliRunner

    from fedlodrop.cli import app

    text = (ROOT / "README.md").read_text()
    quoted = re.findall(r"`(fedlodrop [^`]+)`", text) + [
        line for block in re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[2:] for line in block.splitlines()
    ]
    commands = [c for c in quoted if c.startswith("fedlodrop ") and len(c.split()) > 1]
    assert len(commands) >= 12, commands
    for command in commands:
        result = CliRunner().invoke(app, shlex.split(command)[1:] + ["--help"])
        assert result.exit_code == 0, (command, result.output)
