"""Fixtures shared across test modules."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_indexed(tmp_path_factory):
    """One tiny trained run + its flat index for the whole session (tests/_tiny_run.py):
    ``(folder, config, workdir, embeddings, index_dir)``. Read-only for the tests that share it."""
    from _tiny_run import train_tiny_indexed
    tmp = tmp_path_factory.mktemp("tiny")
    return (tmp, *train_tiny_indexed(tmp))
