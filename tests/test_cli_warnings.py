"""The `fedlodrop` command hides other packages' deprecation noise but not fedlodrop's own warnings.

Run as a real process (`python -m fedlodrop`): under pytest, warnings are recorded instead of
printed, so only a subprocess shows what a user sees on stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# A run of the real CLI entry point (main()), with two notices raised during it: one attributed
# to a third-party module (as transformers' FutureWarning is), one to a fedlodrop module.
SCRIPT = textwrap.dedent(
    """
    import sys

    import fedlodrop.run.engine as engine
    import peft.peft_model as third_party

    source = "def notice(text):\\n    import warnings\\n    warnings.warn(text, FutureWarning)\\n"
    for mod, text in ((third_party, "third-party-notice"), (engine, "fedlodrop-own-notice")):
        exec(compile(source, mod.__file__, "exec"), mod.__dict__)  # the warning names mod
        setattr(mod, "_notice_text", text)

    real_run = engine.run

    def run(*args, **kwargs):
        third_party.notice(third_party._notice_text)
        engine.notice(engine._notice_text)
        return real_run(*args, **kwargs)

    engine.run = run
    from fedlodrop.cli import main

    sys.argv = ["fedlodrop", *sys.argv[1:]]
    main()
    """
)


@pytest.mark.slow  # the CLI in a fresh process
def test_run_hides_third_party_deprecations_but_not_ours(tiny_bert, sst2_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    args = ["run", "--quiet", "--set", "task=sst2", "--set", "data.source=glue_dir",
            "--set", f"data.glue_dir={sst2_dir}", "--set", f"model={tiny_bert}",
            "--set", "federation.rounds=1", "--set", "federation.devices=2", "--out", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "final accuracy" in proc.stdout
    assert "fedlodrop-own-notice" in proc.stderr  # our own warnings stay visible
    assert "third-party-notice" not in proc.stderr
    noise = [line for line in proc.stderr.splitlines()
             if "Warning" in line and "fedlodrop-own-notice" not in line]
    assert noise == []  # e.g. transformers' FutureWarning on `is_gradient_checkpointing`
