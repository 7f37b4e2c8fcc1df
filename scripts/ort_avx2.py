"""Make a copy of the installed onnxruntime whose kernels stop at AVX2, so convgen's AVX2
code can be timed on an AVX-512 machine against what onnxruntime runs on an AVX2 one
(the goals' Zen 3).

    PYTHONPATH=$(python scripts/ort_avx2.py /tmp/ort-avx2) \\
        python scripts/bench_models.py --target llvm:znver3

onnxruntime's MLAS picks its kernels once, at load, from CPUID and XGETBV; it has no
switch. After its AVX2/FMA3 choices it takes the AVX-512 branch where CPUID has
AVX512F and XCR0 enables the opmask and ZMM state: `test al, 0xe0` on XCR0's inverted
low byte, then `je` to that branch. This script replaces that one conditional jump by
a 6-byte NOP in a copy of the Python extension, so MLAS keeps its AVX2 kernels and
their NCHWc block of 8 channels. It checks the patch where it shows: the optimized
graph of a 24-output-channel Conv keeps 24 weight rows (AVX-512's block of 16 pads
them to 32). It refuses where the instruction pattern is not found exactly once, or
the check fails: another onnxruntime build needs its own reading.

Both sides then run AVX2 code on this machine's cores, which is not a Zen 3 (a Zen 4
has twice its L2 and clocks higher): the ratio is the proxy, not the milliseconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

XGETBV = b"\x0f\x01\xd0"
# test al, 0xe0 ; je rel32   (the AVX-512 branch of MLAS's platform constructor)
AVX512_BRANCH = re.compile(rb"\xa8\xe0\x0f\x84")
NOP6 = b"\x66\x0f\x1f\x44\x00\x00"

CHECK = """
import numpy as np, onnx, onnxruntime as ort, sys, tempfile, os
from onnx import helper, numpy_helper, TensorProto
w = numpy_helper.from_array(np.ones((24, 16, 1, 1), np.float32), "w")
g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 24, 8, 8])], [w])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
d = tempfile.mkdtemp()
so = ort.SessionOptions(); so.log_severity_level = 3
so.optimized_model_filepath = os.path.join(d, "opt.onnx")
ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
opt = onnx.load(so.optimized_model_filepath)
print(ort.__file__)
print(max(i.dims[0] for i in opt.graph.initializer))
"""


def _extension(package: Path) -> Path:
    found = sorted((package / "capi").glob("onnxruntime_pybind11_state*.so"))
    if len(found) != 1:
        sys.exit(f"ort_avx2: expected one onnxruntime_pybind11_state*.so in {package / 'capi'}")
    return found[0]


def _patch(library: Path) -> None:
    data = bytearray(library.read_bytes())
    hits = [m.start() for m in AVX512_BRANCH.finditer(data)]
    if len(hits) != 1:
        sys.exit(f"ort_avx2: the AVX-512 branch pattern occurs {len(hits)} times in "
                 f"{library.name}, expected once")
    at = hits[0]
    if data.rfind(XGETBV, max(0, at - 1024), at) < 0:
        sys.exit("ort_avx2: no XGETBV within 1 KB before the branch: not MLAS's dispatch")
    data[at + 2:at + 8] = NOP6
    library.write_bytes(bytes(data))


def _block_rows(root: Path | None) -> tuple[str, int]:
    """(where onnxruntime loaded from, the weight rows of a 24-channel Conv once
    optimized), in a fresh interpreter with `root` (or nothing) on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if root is not None:
        env["PYTHONPATH"] = str(root)
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    return out[0], int(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="where the patched copy goes (its parent for PYTHONPATH)")
    args = parser.parse_args()
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        sys.exit("ort_avx2: onnxruntime is not installed")
    installed = Path(spec.origin).parent
    root = Path(args.dir).resolve()
    target = root / "onnxruntime"
    if target.exists():
        shutil.rmtree(target)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(installed, target)
    _patch(_extension(target))
    origin, rows = _block_rows(root)
    _, stock_rows = _block_rows(None)
    if not origin.startswith(str(target)) or rows != 24:
        shutil.rmtree(target)
        sys.exit(f"ort_avx2: the patched copy pads a 24-channel Conv to {rows} rows "
                 f"(loaded from {origin}); the patch did not take")
    print(f"ort_avx2: NCHWc weights of a 24-channel Conv: {rows} rows patched, "
          f"{stock_rows} installed", file=sys.stderr)
    print(root)


if __name__ == "__main__":
    main()
