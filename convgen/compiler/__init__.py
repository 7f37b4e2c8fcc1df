"""The compiler side: a `ConvSpec` and a target in, a verified artifact out (needs apache-tvm).

The stages, in order: `targets` (the target and its hardware model) ->
`compute` (the algorithm: a TVM PrimFunc, the only place the modes differ) ->
`schedule` (templates per target family and the chooser, which reads the
record library in `records`) -> `build` (tvm.compile, nvcc for CUDA, and the
artifact directory, verified by `convgen.runtime.verify`).
"""
