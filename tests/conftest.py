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
