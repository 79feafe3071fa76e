"""Every CLI example in README.md runs.

The runnable examples are the ```bash blocks; their ``python ...`` commands are executed in order,
in a scratch folder that links to the project's scripts and ``data/``, so relative paths in the
README work and outputs stay in tmp_path. Training examples get ``--max_steps 2
--test_every_n_steps 1`` appended (argparse keeps the last value), so the same command runs in
seconds instead of minutes; nothing else is changed.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SHORT_TRAINING = ["--max_steps", "2", "--test_every_n_steps", "1"]


def readme_commands() -> list[str]:
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("python "):
                commands.append(line)
    return commands


def test_readme_has_an_example_per_stage():
    scripts = {shlex.split(c)[1] for c in readme_commands()}
    assert {"build_lmdb.py", "train_unet.py", "inference_unet.py"} <= scripts


@pytest.mark.slow
def test_readme_examples_run(tmp_path):
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name in ("models", "data", "scripts"):
            os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    for command in readme_commands():
        argv = shlex.split(command)
        argv[0] = sys.executable
        if argv[1] == "train_unet.py":
            argv += SHORT_TRAINING
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README example failed: {command}\n{proc.stderr[-3000:]}"
