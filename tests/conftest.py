import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """The reference material (`shared/`): $DDLP_SHARED, else beside the repository."""
    for candidate in (os.environ.get("DDLP_SHARED"), REPO.parent / "shared", REPO / "shared"):
        if candidate and (Path(candidate) / "fixtures").is_dir():
            return Path(candidate)
    return None


SHARED = shared_dir()
if SHARED is None and os.environ.get("CI"):
    # In CI the reference material is always beside the clone: never let parity silently skip.
    raise RuntimeError("CI run without the reference fixtures (../shared/fixtures); set DDLP_SHARED")
needs_shared = pytest.mark.skipif(SHARED is None, reason="reference fixtures (../shared/fixtures) not found; "
                                  "set DDLP_SHARED to the folder holding fixtures/")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; restore the setting for the tests that follow."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
