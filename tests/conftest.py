import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"  # reference data, provenance in data/README.md


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


# CI explores the same hypothesis examples every run (a failure found locally is kept by the
# example database; CI must not turn green or red by chance).
try:
    import os

    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True)
def _fresh_fused_pieces():
    """Fused pieces (mlx_dsv4/kernels/fuse.py) keep the functions they were traced with: a test that
    monkeypatches one of them (a negative control) must not meet a trace made before, nor leave one behind."""
    from mlx_dsv4.kernels import fuse

    fuse.clear()
    yield
    fuse.clear()
