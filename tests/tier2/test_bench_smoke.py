"""Tier 2: the benchmark command runs and prints its tables (timings are not asserted
here: bench/run_bench.py is where speed and memory are measured)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.host


def test_quick_benchmark_prints_ratios(host):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "run_bench.py"), "--quick"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| SDXL-topology test model")]
    assert len(rows) == 2, out.stdout
    numbers = [float(x) for x in re.findall(r"\| ([0-9]+\.[0-9]+)", " ".join(rows))]
    assert numbers and all(n > 0 for n in numbers)
