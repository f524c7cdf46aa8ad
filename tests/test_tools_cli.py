"""Command-line smoke tests of the table tools (their numbers are tested in test_profile.py): they run, print
what they document, write --out files, and refuse bad arguments."""
import re
import subprocess
import sys

import pytest

import models
from conftest import ROOT
from tools import model_table, table1


def test_model_table_lists_our_and_the_papers_figures(tmp_path, capsys):
    out = tmp_path / "table.md"
    model_table.main(["--models", "resnet26_acmix", "resnet_tiny*", "--no_macs", "--out", str(out)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| resnet")]
    assert [row.split("|")[1].strip() for row in rows] == ["resnet26_acmix", "resnet_tiny", "resnet_tiny_acmix"]
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    paper = models.paper_info("resnet26_acmix")["params_m"]
    ours = float(cells[1])
    assert ours == pytest.approx(10.49, abs=0.01)  # the official code's count (test_models_resnet.py)
    assert float(cells[2]) == paper
    assert float(cells[3].rstrip("%")) == pytest.approx(100 * (ours - paper) / paper, abs=0.1)  # ours is rounded
    assert cells[4] == "—"  # no MACs asked
    assert [cell.strip() for cell in rows[1].strip("|").split("|")][2] == "—"  # not a paper model
    text = out.read_text()
    assert text.startswith("# Model table") and rows[0] in text


def test_model_table_counts_macs_of_a_small_model(capsys):
    model_table.main(["--models", "resnet_tiny", "--img_size", "32"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| resnet_tiny |")][0]
    gmacs = float(row.strip("|").split("|")[4])
    assert 0.01 < gmacs < 1.0  # ~0.1 GMACs at 32 px; the exact count is models.profile's (test_profile.py)


def test_model_table_rejects_unknown_patterns():
    with pytest.raises(ValueError, match="--models nope\\* matches no registered model"):
        model_table.main(["--models", "nope*", "--no_macs"])


def test_table1_prints_the_stage_costs_and_the_paper(tmp_path, capsys):
    out = tmp_path / "table1.md"
    table1.main(["--out", str(out)])
    text = capsys.readouterr().out
    assert "### Sum over the 16 3x3 layers of ResNet-50" in text
    for module in ("convolution", "self_attention", "acmix"):
        assert len(re.findall(rf"^\| {module} \| (I|II) \|", text, re.M)) == 2
    assert "Cross-check" not in text  # --structural not given
    assert out.read_text().startswith("# Table 1")


@pytest.mark.slow
def test_table1_structural_counts_agree_with_the_formulas(capsys):
    table1.main(["--structural"])
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| (convolution|self_attention|"
                                                                            r"acmix) \| (nn|ACmix)", line)]
    assert len(rows) == 3
    for row in rows:
        _, _, f_macs, c_macs, f_params, c_params = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(c_params) == pytest.approx(float(f_params), rel=0.02)
        assert float(c_macs) == pytest.approx(float(f_macs), rel=0.1)


@pytest.mark.slow
def test_bench_operator_quick_runs(tmp_path):
    out = tmp_path / "bench.md"
    result = subprocess.run([sys.executable, "benchmarks/bench_operator.py", "--quick", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.stat().st_size > 0
