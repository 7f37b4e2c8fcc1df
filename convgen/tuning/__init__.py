"""Tuning: measure candidate schedules and keep the fastest as records.

`grid` times every knob setting of convgen's templates on this CPU,
`metaschedule` searches TVM MetaSchedule's own space, `cuda_offline` writes CUDA
candidates here and turns the GPU machine's measurements into records, and
`measure` is that GPU-machine side (runtime imports only: nvcc, tvm-ffi, numpy).
Records are written through `convgen.compiler.records`.
"""
