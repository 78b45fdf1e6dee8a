"""Shared test setup: float64 is enabled for the whole suite.

With x64 on, ``jnp.ones(...)`` defaults to float64, so tests that mean float32 say so.
"""

import pathlib
import tempfile

import background
import jax
import pytest

jax.config.update("jax_enable_x64", True)


def _shared_dir(config) -> pathlib.Path:
    """A folder of this test run that every xdist worker sees (and no other run)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:  # no xdist: this process's own temporary folder
        return config._tmp_path_factory.getbasetemp()
    path = pathlib.Path(tempfile.gettempdir()) / f"braintrace-jobs-{workerinput['testrunuid']}"
    path.mkdir(exist_ok=True)
    return path


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
