"""benchmarks/device_check.sh: the prepared device check (it needs a GPU/Ascend machine to run for real)."""
import os
import re
import subprocess

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.sh")


def test_script_parses_and_refuses_an_unknown_device(tmp_path):
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    done = subprocess.run(["bash", SCRIPT, "TPU", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: bash benchmarks/device_check.sh GPU|Ascend" in done.stderr


def test_step_time_limits_fit_in_ten_minutes():
    """The issue's budget: every step has a limit and together they stay within 10 minutes of device time."""
    text = open(SCRIPT, encoding="utf-8").read()
    limits = [int(value) for value in re.findall(r'^\s*step\s+"?[\w$]+"?\s+(\d+)\s', text, flags=re.M)]
    loops = re.findall(r'^for level in ([\w ]+); do', text, flags=re.M)
    assert loops == ["O2 O3"], loops  # the sink step runs once per AMP level
    names = re.findall(r'^\s*step\s+("?[\w$]+"?)\s+\d+\s', text, flags=re.M)
    per_name = dict(zip(names, limits))
    total = sum(limits) + per_name['"sink_$level"'] * (len(loops[0].split()) - 1)
    assert len(limits) == 7 and total <= 600, (per_name, total)
