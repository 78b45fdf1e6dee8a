"""Shared test setup: float64 is enabled for the whole suite; under xdist the workers
share one JAX compilation cache for the run.

With x64 on, ``jnp.ones(...)`` defaults to float64, so tests that mean float32 say so.
"""

import pathlib
import shutil
import tempfile
import uuid

import background
import jax
import pytest

jax.config.update("jax_enable_x64", True)


def _jobs_dir(uid: str) -> pathlib.Path:
    return pathlib.Path(tempfile.gettempdir()) / f"braintrace-jobs-{uid}"


def _shared_dir(config) -> pathlib.Path:
    """A folder of this test run that every xdist worker sees (and no other run)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:  # no xdist: this process's own temporary folder
        return config._tmp_path_factory.getbasetemp()
    path = _jobs_dir(workerinput["testrunuid"])
    path.mkdir(exist_ok=True)
    return path


def pytest_configure(config):
    """On the xdist controller, fix the run's id, so it can remove the jobs' folder; on
    a worker, share compiled programs with the other worker through that folder (many
    tests compile the same small programs; XLA's compile is most of the suite's time)."""
    if not hasattr(config, "workerinput") and hasattr(config.option, "testrunuid"):
        config.option.testrunuid = config.option.testrunuid or uuid.uuid4().hex
    if hasattr(config, "workerinput"):
        jax.config.update("jax_compilation_cache_dir", str(_shared_dir(config) / "jax-cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def pytest_unconfigure(config):
    uid = getattr(config.option, "testrunuid", None)
    if not hasattr(config, "workerinput") and uid:
        shutil.rmtree(_jobs_dir(uid), ignore_errors=True)


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: only what will run
def pytest_collection_modifyitems(config, items):
    """Start the subprocess jobs (``background.py``) the collected tests need."""
    needed = {
        name
        for name, job in background.JOBS.items()
        if any(job.fixture in getattr(item, "fixturenames", ()) for item in items)
    }
    for name in sorted(needed):
        background.start(name, _shared_dir(config))


@pytest.fixture(scope="session")
def job_stdout(pytestconfig):
    """``job_stdout(name)``: the stdout of background job ``name``, once it has run."""
    return lambda name: background.stdout_of(name, _shared_dir(pytestconfig))
