"""The package as a non-editable install sees it: the wheel carries the record library."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_wheel_builds_from_its_shipped_records(tmp_path):
    """Build the wheel a `pip install` (not -e) would, unpack it away from the checkout,
    and build a ResNet-50 layer from a shipped record with that copy of convgen."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w",
         str(tmp_path / "dist")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("convgen-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        records = [n for n in z.namelist() if n.startswith("convgen/schedules/")]
        z.extractall(site)
    assert len(records) >= 36
    code = f"""
import convgen
assert convgen.__file__.startswith({str(site)!r}), convgen.__file__
from convgen.compiler.build import build_artifact
from convgen.compiler.targets import resolve_target
from convgen.suites import suite_specs
spec = suite_specs("resnet50", modes=("conv",), layouts=("NCHW",))[1]  # C64 56x56 3x3
target = resolve_target('{{"kind": "llvm", "mcpu": "znver4", "num-cores": 2}}')
art = build_artifact(spec, target, {str(tmp_path / "out")!r}, verify=False)
print(art.manifest.schedule.describe())
assert art.manifest.schedule.kind == "record", art.manifest.schedule
"""
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.startswith("record ")
