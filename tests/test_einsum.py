"""The einsum ETP op (``braintrace.ops.einsum``) against BPTT.

Exact class: the einsum drives a LIF membrane (current then voltage) directly, no
recurrent op. D-RTRL's summed gradient equals BPTT's (``jax.grad`` through
``lax.scan``, float64) to 1e-10 for a DenseGeneral-like spec with a free ``x`` axis
(positions ``l``: the trace keeps them) and for a spec with a shared axis (per-head
weights ``h``), batched and unbatched. pp_prop at ``T = 1`` equals D-RTRL.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import braintrace as bt
from braintrace import ops
from braintrace.ops.einsum import trace_numbers
from braintrace.surrogate import spike
from braintrace.testing.reference import bptt_grad
from oracles import rel_err

T, B, L, I, H, O = 4, 2, 3, 2, 2, 3  # noqa: E741
EXACT = 1e-10

#: name -> (batched spec, weight shape, bias shape, x shape of one sample)
SPECS = {
    "dense_general": ("bli,iho->blho", (I, H, O), (H, O), (L, I)),
    "shared_axis": ("bhi,hio->bho", (H, I, O), (H, O), (H, I)),
}


def mse(out, target):
    return jnp.sum((out - target) ** 2)


def _step(spec, batched):
    spec = spec if batched else spec[1:].replace("->b", "->")

    def step(p, h, x):
        y = ops.einsum(spec, x, p["w"], p["b"], batched=batched)
        i = 0.8 * h["i"] + y
        v = 0.7 * h["v"] * (1.0 - spike(h["v"] - 1.0)) + 0.3 * i
        out = jnp.tanh(v).reshape(v.shape[: v.ndim - (y.ndim - batched)] + (-1,)) @ p["ro"]
        return {"i": i, "v": v}, out

    return step


def _problem(name, batched):
    spec, w_shape, b_shape, x_shape = SPECS[name]
    ks = jax.random.split(jax.random.PRNGKey(1), 5)
    lead = (B,) if batched else ()
    y_shape = jnp.einsum(spec, jnp.zeros((B,) + x_shape), jnp.zeros(w_shape)).shape[1:]
    params = {
        "w": jax.random.normal(ks[0], w_shape),
        "b": 0.3 * jax.random.normal(ks[1], b_shape),
        "ro": jax.random.normal(ks[2], (int(jnp.prod(jnp.array(y_shape))), 2)),
    }
    hidden = {"i": jnp.zeros(lead + y_shape), "v": jnp.full(lead + y_shape, 0.5)}
    xs = jax.random.normal(ks[3], (T,) + lead + x_shape)
    targets = jax.random.normal(ks[4], (T,) + lead + (2,))
    return _step(spec, batched), params, hidden, xs, targets


def _grads(algo, step, params, hidden, xs, targets, batched):
    learner = bt.compile(step, mse, algo, batched=batched)
    state = learner.init(params, hidden, xs[0])
    _, grads, _ = jax.jit(learner.scan)(params, state, xs, targets)
    return grads, learner.report(params, hidden, xs[0])


def _check_exact(name, batched):
    step, params, hidden, xs, targets = _problem(name, batched)
    grads, report = _grads(bt.D_RTRL(), step, params, hidden, xs, targets, batched)
    assert "etp_einsum" in str(report)
    ref = bptt_grad(step, mse, params, hidden, xs, targets, batched)
    for key in ("w", "b", "ro"):
        assert rel_err(grads[key], ref[key]) < EXACT, key
    return step, params, hidden, xs, targets, grads


@pytest.mark.slow  # the default run checks the op through the linen face instead
def test_dense_general_exact_batched():
    _check_exact("dense_general", True)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("batched", [True, False])
def test_exact_and_pp_prop_one_step(name, batched):
    step, params, hidden, xs, targets, grads = _check_exact(name, batched)
    # negative control: without the trace's credit the kernel gradient is far off
    one, _ = _grads(bt.OneStep(), step, params, hidden, xs, targets, batched)
    assert rel_err(one["w"], grads["w"]) > 1e-2
    pp1, _ = _grads(bt.pp_prop(0.5), step, params, hidden, xs[:1], targets[:1], batched)
    dr1, _ = _grads(bt.D_RTRL(), step, params, hidden, xs[:1], targets[:1], batched)
    for key in ("w", "b"):
        assert rel_err(pp1[key], dr1[key]) < EXACT


def test_forward_trace_size_and_errors():
    x, w, b = jnp.ones((B, L, I)), jnp.arange(I * H * O, dtype=float).reshape(I, H, O), None
    got = ops.einsum("bli,iho->blho", x, w)
    assert (got == jnp.einsum("bli,iho->blho", x, w)).all()
    b = jnp.ones((H, O))
    assert (ops.einsum("bli,iho->blho", x, w, b) == got + b).all()
    assert trace_numbers("li,iho->lho", (L, I), (I, H, O)) == L * I * H * O
    with pytest.raises(ValueError, match="ops.einsum: spec .* has 3 operands"):
        ops.einsum("bi,io,ok->bk", x[:, 0], w[:, 0])
    with pytest.raises(ValueError, match="ops.einsum: axis 'i' .* is 2 in x but 3"):
        ops.einsum("bli,iho->blho", x, jnp.ones((3, H, O)))
    with pytest.raises(ValueError, match="ops.einsum: bias must have shape"):
        ops.einsum("bli,iho->blho", x, w, jnp.ones((O,)))
    with pytest.raises(ValueError, match="must be explicit"):
        ops.einsum("bli,iho", x, w)
