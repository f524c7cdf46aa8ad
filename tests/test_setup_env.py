"""tools/setup_env.sh picks a supported Python and a project virtual environment where pip may not install.

Run with ``ACMIX_SETUP_DRY_RUN=1`` (the pip commands are printed, not run), so each case takes seconds.
The full install on a fresh Debian 12 Python (venv, MindSpore from PyPI, the CPU torch wheel, the tests)
was run by hand: docs/reliability.md, "Installing".
"""
import os
import re
import subprocess
import sys
import sysconfig

import pytest

from conftest import ROOT

SYSTEM_PYTHON = "/usr/bin/python3"


def source_setup(env_updates, tmp_path):
    """Source tools/setup_env.sh in bash (dry run); returns (exit code, output, ACMIX_PYTHON it set)."""
    env = dict(os.environ, ACMIX_SETUP_DRY_RUN="1", **env_updates)
    env.pop("VIRTUAL_ENV", None)
    script = 'set -euo pipefail; . tools/setup_env.sh; echo "ACMIX_PYTHON=$ACMIX_PYTHON"'
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    match = re.search(r"^ACMIX_PYTHON=(.*)$", result.stdout, re.MULTILINE)
    return result.returncode, output, match.group(1) if match else None


def _externally_managed(python):
    code = ("import os, sys, sysconfig; sys.exit(0 if sys.prefix == sys.base_prefix and os.path.isfile("
            "os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')) else 1)")
    return os.path.isfile(python) and subprocess.run([python, "-c", code]).returncode == 0


def test_a_pip_managed_python_is_used_as_it_is(tmp_path):
    marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
    if os.path.isfile(marker) and sys.prefix == sys.base_prefix:
        pytest.skip("the Python running the tests is itself externally managed")
    venv = tmp_path / "venv"
    code, output, python = source_setup({"PYTHON": sys.executable, "ACMIX_VENV": str(venv)}, tmp_path)
    assert code == 0, output
    assert python == sys.executable and not venv.exists()
    assert f"== {sys.executable} -m pip install -e ." in output


@pytest.mark.skipif(not _externally_managed(SYSTEM_PYTHON),
                    reason=f"needs an externally managed (PEP 668) {SYSTEM_PYTHON}, as on Debian 12")
def test_an_externally_managed_python_gets_a_project_environment(tmp_path):
    venv = tmp_path / "venv"
    env = {"PYTHON": SYSTEM_PYTHON, "ACMIX_VENV": str(venv), "EXTRAS": "test"}
    code, output, python = source_setup(env, tmp_path)
    assert code == 0, output
    assert "is externally managed (PEP 668): creating the project environment" in output
    assert python == str(venv / "bin" / "python") and os.access(python, os.X_OK)
    assert f"== {python} -m pip install -e .[test]" in output
    # a second set-up reuses the environment
    code, output, python_again = source_setup(env, tmp_path)
    assert code == 0 and python_again == python and "creating" not in output


def test_an_unsupported_python_is_refused(tmp_path):
    fake = tmp_path / "python3.13"
    fake.write_text("#!/bin/sh\nexit 1\n")  # answers 'no' to the version check, as Python 3.9 or 3.13 would
    fake.chmod(0o755)
    code, output, python = source_setup({"PYTHON": str(fake)}, tmp_path)
    assert code == 2 and python is None
    assert "is not Python 3.10-3.12" in output


def test_python_requires_matches_what_the_setup_accepts():
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as handle:
        setup = handle.read()
    with open(os.path.join(ROOT, "tools", "setup_env.sh"), encoding="utf-8") as handle:
        script = handle.read()
    assert 'python_requires=">=3.10,<3.13"' in setup
    assert "(3, 10) <= sys.version_info[:2] <= (3, 12)" in script
    assert '"torch-tests": ["torch==2.13.0+cpu"]' in setup  # the CPU build only: never PyPI's CUDA one
    assert "torch" not in re.search(r"install_requires=\[(.*?)\]", setup).group(1)
