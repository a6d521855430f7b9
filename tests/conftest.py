from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _private_dataset_cache(tmp_path_factory):
    """Processed datasets go to a fresh folder: tests never read a stale cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PYG_ADAQP_CACHE", str(tmp_path_factory.mktemp("pyg_adaqp_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"the shared datasets are expected at {SHARED_DATA.resolve()}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cora(shared_data):
    from pyg_adaqp.data import load_dataset
    return load_dataset("cora", root=shared_data)
