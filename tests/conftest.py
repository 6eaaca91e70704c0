import json
from pathlib import Path

import pytest

from peftkit.data import sst2


@pytest.fixture
def sst2_dir() -> Path:
    if not sst2.available():
        pytest.skip(sst2.MISSING)
    return sst2.SST2


@pytest.fixture
def write(tmp_path):
    """write(name, rows) -> path; rows are dicts (JSONL), or a raw string written as is."""
    def _write(name: str, rows) -> Path:
        path = tmp_path / name
        if isinstance(rows, str):
            path.write_text(rows, encoding="utf-8")
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    return _write


class _FamilyModels(dict):
    """family -> its saved tiny random model directory, built on first use (tests/families.py)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> Path:
        from tests.families import build_family
        self[family] = build_family(family, self.root / family)
        return self[family]


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    return _FamilyModels(tmp_path_factory.mktemp("families"))
