import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real data/checkpoints not found at {SHARED} (they live in the team's shared/ folder)")
    return SHARED


def pytest_configure(config):
    """One torch thread per xdist worker: two workers x two OpenMP threads on two cores spin against each other."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _collect_garbage():
    """A GraphModule's graph is a reference cycle, so a test's models (hundreds of MB for the zoo's larger nets) stay
    alive until Python's cycle collector happens to run; collect after each test so two xdist workers never carry
    one test's garbage into the next."""
    yield
    import gc

    gc.collect()
