"""Shared test setup: float64 is enabled for the whole suite.

With x64 on, ``jnp.ones(...)`` defaults to float64, so tests that mean float32 say so.
"""

import fcntl
import json

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(scope="session")
def once_per_run(tmp_path_factory, worker_id):
    """``once_per_run(name, compute)``: ``compute()``'s JSON result, computed once per run.

    Under xdist the tests of one module may land on both workers; a file lock in the
    run's common temporary folder makes the first one compute and the other read.
    """

    def get(name: str, compute):
        if worker_id == "master":  # no xdist: nothing to share
            return compute()
        shared = tmp_path_factory.getbasetemp().parent
        path = shared / f"{name}.json"
        with open(shared / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                path.write_text(json.dumps(compute()))
        return json.loads(path.read_text())

    return get
