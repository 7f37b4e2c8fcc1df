"""Just enough of the CUDA driver API (libcuda.so.1, through ctypes) to feed
precompiled CUDA artifacts from numpy and to time them with CUDA events.

The driver library comes with every NVIDIA driver, so a deployment or GPU
machine needs neither the TVM compiler, nor a CUDA toolkit, nor PyTorch to run
and verify convgen's CUDA artifacts. Buffers are handed to tvm-ffi through the
DLPack protocol. Everything runs on the device's primary context, the one the
CUDA runtime (statically linked into the artifacts) uses too.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from convgen.errors import ToolchainError

_KDLCUDA = 2
_DTYPE_CODES = {"f": 2, "i": 0, "u": 1}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", _DELETER),
    ]


# The buffer object owns the memory; the consumer's deleter call has nothing to free.
_NOOP_DELETER = _DELETER(lambda _ptr: None)
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

_lib: Any = None


def _driver() -> Any:
    """libcuda with the primary context of device 0 current, or ToolchainError."""
    global _lib
    if _lib is not None:
        return _lib
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise ToolchainError("no NVIDIA driver (libcuda.so.1) on this machine") from None
    _check(lib, lib.cuInit(0), "cuInit")
    count = ctypes.c_int()
    _check(lib, lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    if count.value == 0:
        raise ToolchainError("no CUDA device present")
    dev = ctypes.c_int()
    _check(lib, lib.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    _check(lib, lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    _check(lib, lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
    lib.cuMemFree_v2.argtypes = [ctypes.c_uint64]
    lib.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
    lib.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
    lib.cuMemsetD8_v2.argtypes = [ctypes.c_uint64, ctypes.c_ubyte, ctypes.c_size_t]
    _lib = lib
    return lib


def _check(lib: Any, status: int, what: str) -> None:
    if status != 0:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(status, ctypes.byref(name))
        err = name.value.decode() if name.value else str(status)
        raise ToolchainError(f"CUDA driver: {what} failed with {err}")


def gpu_present() -> bool:
    try:
        _driver()
    except ToolchainError:
        return False
    return True


def device_name() -> str:
    lib = _driver()
    buf = ctypes.create_string_buffer(256)
    dev = ctypes.c_int()
    _check(lib, lib.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    _check(lib, lib.cuDeviceGetName(buf, 256, dev), "cuDeviceGetName")
    return buf.value.decode()


class DeviceArray:
    """A dense array in GPU memory that tvm-ffi takes through DLPack."""

    def __init__(self, shape: tuple[int, ...], dtype: str | np.dtype) -> None:
        lib = _driver()
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = max(1, int(np.prod(self.shape)) * self.dtype.itemsize)
        ptr = ctypes.c_uint64()
        _check(lib, lib.cuMemAlloc_v2(ctypes.byref(ptr), self.nbytes), "cuMemAlloc")
        self.ptr = ptr.value
        self._shape_c = (ctypes.c_int64 * len(self.shape))(*self.shape)
        self._managed: list[_DLManagedTensor] = []

    @classmethod
    def from_numpy(cls, a: np.ndarray) -> DeviceArray:
        host = np.ascontiguousarray(a)
        arr = cls(host.shape, host.dtype)
        arr.copy_from(host)
        return arr

    def copy_from(self, a: np.ndarray) -> None:
        host = np.ascontiguousarray(a, dtype=self.dtype)
        lib = _driver()
        _check(lib, lib.cuMemcpyHtoD_v2(self.ptr, host.ctypes.data, host.nbytes), "cuMemcpyHtoD")

    def numpy(self) -> np.ndarray:
        host = np.empty(self.shape, self.dtype)
        lib = _driver()
        _check(lib, lib.cuMemcpyDtoH_v2(host.ctypes.data, self.ptr, host.nbytes), "cuMemcpyDtoH")
        return host

    def fill_zero(self) -> None:
        lib = _driver()
        _check(lib, lib.cuMemsetD8_v2(self.ptr, 0, self.nbytes), "cuMemsetD8")

    def __dlpack_device__(self) -> tuple[int, int]:
        return (_KDLCUDA, 0)

    def __dlpack__(self, stream: Any = None, **_kwargs: Any) -> Any:
        managed = _DLManagedTensor()
        t = managed.dl_tensor
        t.data = self.ptr
        t.device = _DLDevice(_KDLCUDA, 0)
        t.ndim = len(self.shape)
        t.dtype = _DLDataType(_DTYPE_CODES[self.dtype.kind], self.dtype.itemsize * 8, 1)
        t.shape = self._shape_c
        t.strides = None
        t.byte_offset = 0
        managed.deleter = _NOOP_DELETER
        self._managed.append(managed)  # alive as long as this array
        return _capsule_new(ctypes.addressof(managed), b"dltensor", None)

    def __del__(self) -> None:
        if getattr(self, "ptr", None) and _lib is not None:
            _lib.cuMemFree_v2(self.ptr)
            self.ptr = 0


def synchronize() -> None:
    lib = _driver()
    _check(lib, lib.cuCtxSynchronize(), "cuCtxSynchronize")


class EventTimer:
    """Times GPU work between two CUDA events on the default stream, in milliseconds."""

    def __init__(self) -> None:
        lib = _driver()
        self._start, self._stop = ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib, lib.cuEventCreate(ctypes.byref(self._start), 0), "cuEventCreate")
        _check(lib, lib.cuEventCreate(ctypes.byref(self._stop), 0), "cuEventCreate")

    def start(self) -> None:
        _check(_driver(), _driver().cuEventRecord(self._start, None), "cuEventRecord")

    def stop_ms(self) -> float:
        lib = _driver()
        _check(lib, lib.cuEventRecord(self._stop, None), "cuEventRecord")
        _check(lib, lib.cuEventSynchronize(self._stop), "cuEventSynchronize")
        ms = ctypes.c_float()
        _check(lib, lib.cuEventElapsedTime(ctypes.byref(ms), self._start, self._stop), "elapsed")
        return float(ms.value)
