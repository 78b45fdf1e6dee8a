"""Helpers shared by the tests: jaxpr inspection, tolerances, loading an example script."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

from braintrace import registry

F32, F64 = jnp.float32, jnp.float64
TOL = {np.dtype(F32): dict(rtol=1e-5, atol=1e-5), np.dtype(F64): dict(rtol=1e-12, atol=1e-12)}


def mse(out, target):
    """Per-sample squared error (the loss of the face tests)."""
    return jnp.sum((out - target) ** 2)


def leaves(tree) -> list:
    return jax.tree_util.tree_leaves(tree)


def flat(tree):
    """Every leaf of ``tree`` raveled into one vector."""
    return jnp.concatenate([jnp.ravel(a) for a in leaves(tree)])


def collect_primitives(jaxpr) -> list:
    """All primitives of ``jaxpr``, walking nested (closed) jaxprs in eqn params."""
    if isinstance(jaxpr, ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn.primitive)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                    found.extend(collect_primitives(sub))
    return found


def prims_of(fn, *args) -> list:
    return collect_primitives(jax.make_jaxpr(fn)(*args))


def etp_eqn(fn, *args):
    """The single top-level ETP equation of ``make_jaxpr(fn)(*args)``."""
    eqns = [
        e for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if registry.is_etp_primitive(e.primitive)
    ]
    assert len(eqns) == 1, eqns
    return eqns[0]


def assert_close(got, exp, dtype):
    """Same tree, shapes and dtype (``dtype``), values equal to ``dtype``'s tolerance."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(exp)
    for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(exp)):
        assert g.shape == e.shape
        assert g.dtype == np.dtype(dtype), (g.dtype, dtype)
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), **TOL[np.dtype(dtype)])


EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (its folder on ``sys.path``, as when run)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (flax modules) look their module up
    spec.loader.exec_module(module)
    return module


def run_example(name: str, *args: str, timeout: int = 300) -> dict:
    """Run ``examples/<name>.py args`` in a fresh interpreter (the user's defaults: float32)
    and return the JSON summary on its last stdout line (every example's contract)."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    return json.loads(lines[-1])
