from __future__ import annotations

import shutil

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """cuda tests need nvcc; gpu tests need a GPU: skip with the reason, never pass silently."""
    from convgen.runtime import cuda_driver

    has_nvcc = shutil.which("nvcc") is not None
    has_gpu = cuda_driver.gpu_present()
    for item in items:
        if "cuda" in item.keywords and not has_nvcc:
            item.add_marker(pytest.mark.skip(reason="nvcc not found"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="no NVIDIA GPU present"))


@pytest.fixture(scope="session")
def cpu_target():
    from convgen.compiler.targets import resolve_target

    return resolve_target("llvm")
