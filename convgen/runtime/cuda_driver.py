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
import functools
import math
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


# DLPack exports (`export_dlpack`) alive until their consumer calls the deleter: the
# managed struct and the object that owns the memory, by the struct's address.
_exported: dict[int, tuple[_DLManagedTensor, Any]] = {}


def _release(address: int | None) -> None:
    _exported.pop(address or 0, None)


def _python_api(name: str, restype: Any, *argtypes: Any) -> Any:
    """A function of Python's C API with a prototype of its own (the attributes of
    `ctypes.pythonapi` are shared objects: setting one's argtypes sets everyone's)."""
    return ctypes.PYFUNCTYPE(restype, *argtypes)((name, ctypes.pythonapi))


_DELETER_FN = _DELETER(_release)
_CAPSULE_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_capsule_new = _python_api("PyCapsule_New", ctypes.py_object, ctypes.c_void_p,
                           ctypes.c_char_p, _CAPSULE_DESTRUCTOR)
# by address: in the destructor, the capsule is being freed
_capsule_is_valid = _python_api("PyCapsule_IsValid", ctypes.c_int, ctypes.c_void_p,
                                ctypes.c_char_p)
_capsule_pointer = _python_api("PyCapsule_GetPointer", ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_char_p)


def _destroy_capsule(capsule: int) -> None:
    """A capsule nobody consumed (still named "dltensor") releases its export; a
    consumer renames it "used_dltensor" and calls the deleter itself when done."""
    if _capsule_is_valid(capsule, b"dltensor"):
        _release(_capsule_pointer(capsule, b"dltensor"))


_CAPSULE_DESTRUCTOR_FN = _CAPSULE_DESTRUCTOR(_destroy_capsule)


@functools.cache
def _dl_device(device: tuple[int, int]) -> _DLDevice:
    return _DLDevice(*device)


@functools.cache
def _dl_dtype(dtype: np.dtype) -> _DLDataType:
    return _DLDataType(_DTYPE_CODES[dtype.kind], dtype.itemsize * 8, 1)


def export_dlpack(owner: Any, ptr: int, device: tuple[int, int], shape_c: Any, ndim: int,
                  dtype: np.dtype) -> Any:
    """A DLPack capsule (dense, C order) of the memory at `ptr`, which `owner` keeps
    alive: the export holds `owner` until the consumer (PyTorch, tvm-ffi, numpy) calls
    the deleter, so a tensor made from it stays valid after the caller drops `owner`.
    Every call of a kernel exports its DeviceArray arguments, so the struct is built in
    one constructor call from cached device and dtype structs (ctypes copies them in):
    2.2 us against 3.6 field by field."""
    managed = _DLManagedTensor(
        _DLTensor(ptr, _dl_device(device), ndim, _dl_dtype(dtype), shape_c, None, 0),
        None, _DELETER_FN)
    address = ctypes.addressof(managed)
    _exported[address] = (managed, owner)
    return _capsule_new(address, b"dltensor", _CAPSULE_DESTRUCTOR_FN)

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


# Device memory of dropped arrays, by size, for the next array of that size: cuMemAlloc
# and cuMemFree take tens of microseconds (cuMemFree also waits for the device), as
# long as a small kernel runs, and a kernel called on device tensors returns a new
# array per call. (PyTorch's caching allocator does the same.)
_free_blocks: dict[int, list[int]] = {}


def _allocate(nbytes: int) -> int:
    blocks = _free_blocks.get(nbytes)
    if blocks:
        return blocks.pop()
    lib = _driver()
    ptr = ctypes.c_uint64()
    _check(lib, lib.cuMemAlloc_v2(ctypes.byref(ptr), nbytes), "cuMemAlloc")
    return ptr.value


def empty_cache() -> None:
    """Give the cached memory of dropped arrays back to the driver."""
    for blocks in _free_blocks.values():
        while blocks:
            _lib.cuMemFree_v2(blocks.pop())


class DeviceArray:
    """A dense array in GPU memory; tvm-ffi, PyTorch (`torch.from_dlpack`) and other
    DLPack consumers take it without a copy."""

    def __init__(self, shape: tuple[int, ...], dtype: str | np.dtype) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = max(1, math.prod(self.shape) * self.dtype.itemsize)
        self.ptr = _allocate(self.nbytes)
        self._shape_c = (ctypes.c_int64 * len(self.shape))(*self.shape)

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
        # every kernel runs on the default stream, as PyTorch's current stream is unless
        # the caller changed it: nothing to synchronize for a consumer's `stream`
        return export_dlpack(self, self.ptr, self.__dlpack_device__(), self._shape_c,
                             len(self.shape), self.dtype)

    def __del__(self) -> None:
        if getattr(self, "ptr", None):
            _free_blocks.setdefault(self.nbytes, []).append(self.ptr)
            self.ptr = 0


def ffi_tensor(a: DeviceArray) -> Any:
    """A tvm-ffi tensor over `a`'s memory, for what every call passes again (a bound
    kernel's weights, a workspace). tvm-ffi turns each DeviceArray argument of a call
    into such a tensor through `__dlpack__` (`export_dlpack`'s ctypes structures: about
    3.5 us of Python per argument, a tenth of a small kernel); made once, it is passed
    as it is. It keeps `a` alive through its export until it is dropped itself."""
    import tvm_ffi

    return tvm_ffi.from_dlpack(a)


_capsule_set_name = _python_api("PyCapsule_SetName", ctypes.c_int, ctypes.py_object,
                                ctypes.c_char_p)
_capsule_pointer_of = _python_api("PyCapsule_GetPointer", ctypes.c_void_p, ctypes.py_object,
                                  ctypes.c_char_p)
_NUMPY_KINDS = {code: kind for kind, code in _DTYPE_CODES.items()}


def to_numpy(tensor: Any) -> np.ndarray:
    """A copy on the host of a dense GPU tensor that exports DLPack (a deployed CUDA
    model's outputs, tvm-ffi tensors), read through the driver."""
    capsule = tensor.__dlpack__()
    managed = _DLManagedTensor.from_address(_capsule_pointer_of(capsule, b"dltensor"))
    t = managed.dl_tensor
    shape = tuple(t.shape[i] for i in range(t.ndim))
    if t.strides and any(t.strides[i] != int(np.prod(shape[i + 1:])) for i in range(t.ndim)):
        raise ToolchainError("to_numpy: only dense C-order tensors")
    dtype = np.dtype(f"{_NUMPY_KINDS[t.dtype.code]}{t.dtype.bits // 8}")
    host = np.empty(shape, dtype)
    lib = _driver()
    _check(lib, lib.cuMemcpyDtoH_v2(host.ctypes.data, (t.data or 0) + t.byte_offset,
                                    host.nbytes), "cuMemcpyDtoH")
    _capsule_set_name(capsule, b"used_dltensor")  # consumed: its deleter is ours to call
    if managed.deleter:
        managed.deleter(ctypes.addressof(managed))
    return host


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
