"""The runtime side: everything a deployment or a GPU machine needs, without the TVM compiler.

Loading and calling artifacts (`kernel`) and deployed models (`model`), the
artifact's manifest (`manifest`),
the CUDA driver (`cuda_driver`), nvcc (`nvcc`), timing (`timing`), the cores
this process may use (`cores`), and verifying and benchmarking artifacts built
elsewhere (`verify`, `bench`). Modules here import numpy, tvm-ffi (the 3 MB
`apache-tvm-ffi` wheel), onnx and onnxruntime, and the operator-level modules
(`convgen.spec`, `convgen.reference`, `convgen.onnx_export`), never `tvm` (the
compiler), `convgen.compiler` or `convgen.tuning`: tests/test_boundaries.py
enforces it.
"""

from convgen.runtime.kernel import BoundKernel, Kernel, load
from convgen.runtime.model import Model

__all__ = ["BoundKernel", "Kernel", "Model", "load"]
