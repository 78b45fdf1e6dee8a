"""Subprocess jobs that start when the tests needing them are collected.

Some checks run in a fresh interpreter (the README blocks, the 2-device runs): a CPU
is split into devices, or the suite's x64 setting is kept out, only in a new process.
Started when a test asks for the result, such a job leaves an xdist worker waiting
for it; started at collection (``pytest_collection_modifyitems`` in ``conftest.py``),
it runs beside the other tests. Each job runs once per test run, whichever worker
starts it: an exclusive-create marker file in the run's shared temporary folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

#: Runs a job spec (argv, stdin, env, cwd) and records its stdout, stderr and status.
_LAUNCHER = """
import json, pathlib, subprocess, sys
spec, base = json.loads(sys.argv[1]), pathlib.Path(sys.argv[2])
try:
    proc = subprocess.run(spec["argv"], input=spec["stdin"], env=spec["env"], cwd=spec["cwd"],
                          capture_output=True, text=True, timeout=900)
    out, err, rc = proc.stdout, proc.stderr, proc.returncode
except subprocess.TimeoutExpired as error:
    out, err, rc = "", f"timed out after {error.timeout} s", -1
base.with_suffix(".out").write_text(out)
base.with_suffix(".err").write_text(err)
base.with_suffix(".tmp").write_text(str(rc))
base.with_suffix(".tmp").rename(base.with_suffix(".rc"))
"""


#: How long a test waits for a job: longer than the launcher's own 900 s timeout.
_WAIT_SECONDS = 1200


@dataclasses.dataclass(frozen=True)
class Job:
    fixture: str  # the fixture whose tests need the job
    argv: list
    stdin: str | None = None
    env: dict | None = None
    cwd: str | None = None


JOBS: dict[str, Job] = {}


def register(name: str, job: Job) -> None:
    """Declare a job (at import, i.e. collection, time)."""
    JOBS[name] = job


def start(name: str, shared: pathlib.Path) -> None:
    """Start job ``name`` unless some process of this run already has."""
    try:
        (shared / f"{name}.started").open("x").close()
    except FileExistsError:
        return
    job = JOBS[name]
    spec = {
        "argv": job.argv,
        "stdin": job.stdin,
        "env": job.env or dict(os.environ),
        "cwd": job.cwd,
    }
    subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, json.dumps(spec), str(shared / name)],
        start_new_session=True,
    )


def stdout_of(name: str, shared: pathlib.Path) -> str:
    """The job's stdout once it has finished (starting it if nobody has)."""
    start(name, shared)
    done = shared / f"{name}.rc"
    deadline = time.monotonic() + _WAIT_SECONDS
    while not done.exists():
        if time.monotonic() > deadline:  # the launcher died without a status
            raise AssertionError(f"background job {name!r} gave no status in {_WAIT_SECONDS} s")
        time.sleep(0.2)
    if int(done.read_text()) != 0:
        error = (shared / f"{name}.err").read_text()
        raise AssertionError(f"background job {name!r} failed:\n{error[-3000:]}")
    return (shared / f"{name}.out").read_text()


def last_json(stdout: str):
    """The JSON object on the last line of a job's stdout."""
    return json.loads(stdout.strip().splitlines()[-1])
