"""scripts/gpu_check.sh --dry-run: every command of the GPU check, at toy size on the CPU, so that no GPU minute
is lost to a wrong override. Compiling is left to the GPU run (it takes minutes on a CPU)."""

import os
import subprocess
import sys
import tarfile

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_every_command_in_its_dry_run(tmp_path):
    # PYTHON: this interpreter (the venv's), which `python` on the PATH need not be.
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ") and "| check |" not in line]
    # 8 single checks, packing at 1 and 2 jobs (the GPU run adds 4), 4 benchmark rows
    assert len(table) == 14 and all("| ok |" in line for line in table), "\n".join(table)
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as archive:
        names = archive.getnames()
    assert "./summary.md" in names and any(n.endswith("bench_resnet18_compiled/variants.csv") for n in names)
    assert not any(n.endswith(".pt") for n in names)
