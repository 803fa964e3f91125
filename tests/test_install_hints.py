"""Without the optional extras (CI's second leg installs the package bare), the verbs that need one say what to
install instead of failing with an ImportError; the rest of the command works."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.no_extras,
    pytest.mark.skipif(importlib.util.find_spec("fastapi") is not None, reason="the serve extra is installed here"),
]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_inspect.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("verb", [["serve", "--model", "m"], ["label", "photos", "--station", "st"]])
def test_serve_and_label_name_the_extra_to_install(verb: list[str], tmp_path):
    result = run(*verb)
    assert result.returncode == 1, result.stderr
    assert "pip install 'vlm-inspect[serve]'" in " ".join(result.stderr.split()) and "Traceback" not in result.stderr


def test_help_and_env_work_and_env_says_which_extras_are_missing():
    assert run("--help").returncode == 0
    env = run("env")
    assert env.returncode == 0 and "extra [serve]" in env.stdout and "not installed" in env.stdout
