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
