import os
import zlib

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's CPU interpreter (tests/test_triton.py); the
# variable must be set before triton is first imported, which importing csext does.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import csext  # noqa: E402

# CI sets CSEXT_REQUIRE_EXTENSION=1: a missing C++ extension then fails the run instead of
# quietly skipping every cpp test.
if os.environ.get("CSEXT_REQUIRE_EXTENSION") == "1" and "cpp" not in csext.backends.available():
    raise RuntimeError(f"CSEXT_REQUIRE_EXTENSION=1 but csext._C is missing: {csext.backends.aten.load_error()}")


def pytest_report_header(config):
    return f"csext {csext.__version__} from {os.path.dirname(csext.__file__)}; backends {csext.backends.available()}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh draw per test, reproducible from the test's name.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))  # hash() of a str changes per process
