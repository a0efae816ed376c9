"""Test configuration shared by the whole suite.

Without a CUDA device the Triton kernels run in Triton's interpreter, which must be chosen
before any kernel module is imported; tests under tests/gpu/ are skipped there.
"""

import contextlib
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.gpu)
            if not HAS_CUDA:
                item.add_marker(skip_gpu)


@contextlib.contextmanager
def threads_kept(n: int | None = None):
    """Run a block with ``n`` torch threads (or as many as now) and give the old count back after:
    training runs set their own thread count, and small tensors are fastest on one thread on a
    shared CPU (extra intra-op threads mostly spin-wait for each other)."""
    before = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One torch thread for a test (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    with threads_kept(1):
        yield


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One torch thread for a whole module, its module-scoped fixtures included."""
    with threads_kept(1):
        yield


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package; the
    folder goes on ``sys.path`` so that one benchmark can import another)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
