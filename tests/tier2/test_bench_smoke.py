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
    assert len(rows) == 3, out.stdout
    numbers = [float(x) for x in re.findall(r"\| ([0-9]+\.[0-9]+)", " ".join(rows))]
    assert numbers and all(n > 0 for n in numbers)


def test_op_counter_holds_the_step_budgets(host, tmp_path):
    """bench/op_count.py on the SD1.x topology: recording maps costs a few percent of a plain
    step, and a guided step waits for the device nowhere inside its forward and backward
    (op counts are exact, not timings)."""
    result = tmp_path / "ops.json"
    rows = "plain;capture only;strength 0;unguided steps of a guided run;guided fast, split"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "op_count.py"), "--topologies", "sd1",
                          "--only", rows, "--json", str(result)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    sd1 = json.loads(result.read_text())["sd1"]
    ratio = {name: r["ops"] / sd1["plain"]["ops"] for name, r in sd1.items()}
    assert ratio["capture only"] <= 1.1 and ratio["unguided steps of a guided run"] <= 1.05, ratio
    assert ratio["strength 0"] <= 1.3, ratio
    guided = sd1["guided fast, split"]["parts"]
    assert guided["work"] == 0 and guided["after"] <= 1, guided


def test_op_counter_on_an_mmdit_model(host, tmp_path):
    """bench/op_count.py on the narrow Flux.1-dev (cfg 1): the guided step waits for the device
    nowhere inside its forward and backward, as on the UNet, in `fast` and in `low`."""
    result = tmp_path / "ops.json"
    rows = "plain;guided fast, split;guided low"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "op_count.py"), "--topologies", "flux_dev",
                          "--only", rows, "--json", str(result)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    flux = json.loads(result.read_text())["flux_dev"]
    for name in ("guided fast, split", "guided low"):
        parts = flux[name]["parts"]
        assert parts["work"] == 0 and parts["after"] <= 1, (name, parts)
        assert flux[name]["ops"] > 2 * flux["plain"]["ops"]  # a forward with autograd and a backward ran
