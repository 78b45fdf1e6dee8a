"""The compile report as a user reads it: short rows that fit 120 columns, the long
form on demand, words that agree with the ops table, and the user's own line.
"""

from __future__ import annotations

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import braintrace as bt
import braintrace_flax as btf
from braintrace import ops
from braintrace.compiler import compile_graph

HERE = os.path.basename(__file__)


def _stack(p, h, x):
    """A recurrent layer under a second layer: every lower-layer leaf is approximate."""
    h1, h2 = h
    a = ops.elemwise(p["d1"], jax.nn.sigmoid)
    h1 = a * h1 + jnp.tanh(ops.dense(x, p["w1"]) + ops.dense(h1, p["u1"]))
    h2 = 0.9 * h2 + jnp.tanh(ops.dense(h1, p["w2"]))
    return (h1, h2), h2 @ p["ro"]


def _stack_report():
    params = {
        "d1": jnp.ones(4),
        "u1": jnp.ones((4, 4)),
        "w1": jnp.ones((3, 4)),
        "w2": jnp.ones((4, 5)),
        "ro": jnp.ones((5, 2)),
    }
    return compile_graph(_stack, params, (jnp.zeros(4), jnp.zeros(5)), jnp.zeros(3)).report


def contradictions(report) -> list[str]:
    """Each "feeds op #j (...) of group #g" whose op #j the ops table does not list
    under group #g."""
    groups = {op.index: set(op.groups) for op in report.ops}
    found = []
    for entry in report.params:
        for j, g in re.findall(r"feeds op #(\d+) \([^)]*\) of group #(\d+)", entry.reason):
            if int(g) not in groups[int(j)]:
                found.append(f"{entry.path}: op #{j} of group #{g}")
    return found


def test_stacked_layer_rows_are_short_and_the_long_form_is_kept():
    report = _stack_report()
    text = str(report)
    assert max(len(line) for line in text.splitlines()) <= 120
    w1 = report.param("['w1']")
    assert w1.gradient == "approximate"
    assert "lower layer of a stack (group #0 feeds group #1)" in w1.short
    assert "recurrent (op #2 reads group #0)" in w1.short
    assert len(w1.short) < len(w1.reason) // 2 and "\n" not in w1.short
    assert w1.reason == "; ".join(w1.findings) and len(w1.findings) >= 3
    explained = " ".join(str(report.explain("['w1']")).split())
    for finding in w1.findings:  # every finding, wrapped onto lines of its own
        assert " ".join(finding.split()) in explained
    assert re.search(r"^  \['w1'\]\s.*approximate", text, re.M)
    with pytest.raises(KeyError, match="no parameter"):
        report.explain("['nope']")


def test_the_reasons_agree_with_the_ops_table():
    report = _stack_report()
    assert contradictions(report) == []
    u1 = report.param("['u1']").reason
    assert "group #0 reaches group #1 through the input of op #2 (etp_mv: params['u1'])" in u1
    # Negative control: the old wording, which put op #2 under group #1, is caught.
    old = "group #0 feeds op #2 (etp_mv: params['u1']) of group #1"
    entry = report.param("['u1']").__class__(**{**vars(report.param("['u1']")), "reason": old})
    fake = report.__class__(**{**vars(report), "params": (entry,)})
    assert contradictions(fake) == ["['u1']: op #2 of group #1"]


class _ConvGRU(nn.Module):
    @nn.compact
    def __call__(self, h, x):
        u = nn.ConvLocal(4, (3,))(x)  # the line the report and the warning must point at
        return nn.GRUCell(8)(h, u.reshape(u.shape[0], -1))


def test_a_converted_layer_is_reported_at_the_users_line():
    x, h = jnp.ones((2, 5, 3), jnp.float32), jnp.zeros((2, 8), jnp.float32)
    model = _ConvGRU()
    params = model.init(jax.random.key(0), h, x)["params"]
    learner = btf.compile(
        model, lambda o, y: jnp.sum((o - y) ** 2), bt.D_RTRL(), convert_dense=True
    )
    kernel = learner.report(params, h, x).param("['ConvLocal_0']['kernel']")
    line = next(i for i, s in enumerate(open(__file__), 1) if "nn.ConvLocal(4, (3,))(x)" in s)
    assert kernel.gradient == "truncated"
    assert f"{HERE}:{line}" in kernel.short and f"{HERE}:{line}" in kernel.reason
    assert "convert.py" not in kernel.reason and "interceptor" not in kernel.reason
    with pytest.warns(bt.TruncationWarning) as record:
        learner.init(params, h, x)
    message = str(record[0].message)
    assert f"{HERE}:{line}" in message and "convert.py" not in message
    assert record[0].filename == __file__
