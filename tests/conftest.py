"""Fixtures shared across test modules."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest


def _fast_compiles() -> None:
    """Tests check behaviour, not speed: compile with LLVM's backend optimisation off
    (``--xla_backend_optimization_level=0``), which is most of the compile time of these tiny
    models (a fifth of the suite's time on 2 cores; measured on tests/test_model.py: 61 s -> 47 s).
    XLA's own graph passes (fusion, simplification) still run. Subprocesses inherit it. Set the flag
    in XLA_FLAGS yourself to choose another level (e.g. 3, the default outside the tests)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole session, in-process and for every
    subprocess the tests start (they inherit the environment): the suite compiles the same tiny
    models many times. A fresh folder per session, removed at the end, so nothing carries over
    between sessions. Set JAX_COMPILATION_CACHE_DIR yourself to choose (and keep) the folder."""
    _fast_compiles()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    folder = tempfile.mkdtemp(prefix="mmvae-tests-xla-cache-")
    config._mmvae_xla_cache = folder
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    # Every compilation, however small: a subprocess the tests start (a CLI, a server, a training
    # worker) otherwise recompiles each primitive it runs eagerly (model initialisation alone is
    # ~8 s of 30 ms compilations on 2 cores, ~1 s from the cache).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    if "jax" in sys.modules:        # a plugin imported JAX first: its config already read the environment
        import jax
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
        jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                          int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def pytest_unconfigure(config):
    folder = getattr(config, "_mmvae_xla_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_indexed(tmp_path_factory):
    """One tiny trained run + its flat index for the whole session (tests/_tiny_run.py):
    ``(folder, config, workdir, embeddings, index_dir)``. Read-only for the tests that share it."""
    from _tiny_run import train_tiny_indexed
    tmp = tmp_path_factory.mktemp("tiny")
    return (tmp, *train_tiny_indexed(tmp))
