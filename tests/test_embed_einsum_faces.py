"""Embedding and einsum twins in the three faces: bit-identical to the stock layers, and exact.

- Linen ``ETPEmbed`` / ``ETPEinsum`` / ``ETPDenseGeneral`` against ``nn.Embed`` (with
  ``attend``) / ``nn.Einsum`` / ``nn.DenseGeneral``; NNX ``ETPEmbed`` / ``ETPEinsum`` /
  ``ETPLinearGeneral`` against ``nnx.Embed`` / ``nnx.Einsum`` / ``nnx.LinearGeneral``;
  Equinox ``ETPEmbedding`` against ``eqx.nn.Embedding``: the same variables after
  ``init`` (same key), the same outputs (exact equality, float32), and the converters
  (``convert_dense=True``, ``btnnx.convert``, ``from_eqx`` / ``to_eqx``) keep the
  parameters and outputs while routing the layers through the ETP ops.
- One D-RTRL check per face: a model whose (stock, converted) embedding and einsum /
  DenseGeneral drive a LIF membrane directly, with a sequence of ids per sample that
  repeats an id; D-RTRL's summed gradient equals BPTT's (float64, 1e-10).
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import braintrace as bt
import braintrace_eqx as bte
import braintrace_flax as btf
from braintrace.surrogate import spike
from braintrace.testing.reference import bptt_grad
from braintrace_flax import nnx as btnnx
from oracles import rel_err

V, F, L, I, T, B = 6, 3, 2, 2, 4, 2  # noqa: E741
EXACT = 1e-10
X32 = jnp.linspace(-1.0, 1.0, 2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
IDS = jnp.array([[1, 5], [0, 1]])


def _same(a, b) -> bool:
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda u, v: (u, v), a, b))
    pairs = zip(leaves[::2], leaves[1::2])
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        u.shape == v.shape and u.dtype == v.dtype and bool((u == v).all()) for u, v in pairs
    )


def _etp_prims(fn, *args) -> set:
    return {e.primitive.name for e in jax.make_jaxpr(fn)(*args).eqns if "etp" in str(e.primitive)}


LINEN = [
    (btf.ETPEmbed, nn.Embed, (V, F), IDS),
    (btf.ETPEinsum, nn.Einsum, ((3, 2, 4), "bli,iho->blho"), X32),
    (btf.ETPDenseGeneral, nn.DenseGeneral, ((2, 4), (-1, -2)), X32),
    (btf.ETPEinsum, nn.Einsum, ((3, 4), "...i,io->...o"), X32),
    (btf.ETPDenseGeneral, nn.DenseGeneral, ((2, 4),), X32),
    (btf.ETPDenseGeneral, nn.DenseGeneral, ((2, 4), -1, 0), X32),  # kernel per batch entry
]
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "case", [0, 1, 2] + [pytest.param(k, marks=_SLOW) for k in range(3, len(LINEN))]
)
def test_linen_twins_are_bit_identical(case):
    twin, stock, args, x = LINEN[case]
    got, ref = twin(*args).init(jax.random.key(0), x), stock(*args).init(jax.random.key(0), x)
    assert _same(got, ref)
    v = jax.tree_util.tree_map(lambda a: a + jnp.linspace(0, 0.1, a.size).reshape(a.shape), ref)
    y_ref = stock(*args).apply(v, x)
    assert _same(twin(*args).apply(v, x), y_ref)
    with btf.etp_dense_calls():  # the stock layer, converted
        assert _same(stock(*args).apply(v, x), y_ref)
        assert _etp_prims(lambda v: stock(*args).apply(v, x), v)
    if stock is nn.Embed:
        q = jnp.ones((2, F), jnp.float32)
        a_ref = stock(*args).apply(v, q, method="attend")
        assert _same(twin(*args).apply(v, q, method="attend"), a_ref)
        with pytest.raises(ValueError, match="ETPEmbed at .*inputs must be integer ids"):
            twin(*args).apply(v, q)


def test_nnx_and_eqx_twins_are_bit_identical():
    emb = nnx.Embed(V, F, rngs=nnx.Rngs(0))
    ein = nnx.Einsum("bli,iho->blho", (3, 2, 4), (2, 4), rngs=nnx.Rngs(0))
    q = jnp.ones((2, F), jnp.float32)
    refs = (emb(IDS), emb.attend(q), ein(X32))
    states = (nnx.state(emb), nnx.state(ein))
    twins = (
        btnnx.ETPEmbed(V, F, rngs=nnx.Rngs(0)),
        btnnx.ETPEinsum("bli,iho->blho", (3, 2, 4), (2, 4), rngs=nnx.Rngs(0)),
    )
    assert _same(nnx.state(twins[0]), states[0]) and _same(nnx.state(twins[1]), states[1])
    btnnx.convert(emb), btnnx.convert(ein)
    assert type(emb) is btnnx.ETPEmbed and type(ein) is btnnx.ETPEinsum
    assert nnx.state(emb) == states[0] and nnx.state(ein) == states[1]
    assert _same((emb(IDS), emb.attend(q), ein(X32)), refs)
    assert _etp_prims(emb, IDS) == {"etp_embed_batched"}
    with pytest.raises(ValueError, match=r"ETPEmbed\(6, 3\): inputs must be integer ids"):
        emb(q)
    key = jax.random.PRNGKey(0)
    stock, twin = eqx.nn.Embedding(V, F, key=key), bte.ETPEmbedding(V, F, key=key)
    assert _same(twin.weight, stock.weight)
    model = {"emb": stock, "lin": eqx.nn.Linear(F, 2, key=key)}
    converted = bte.from_eqx(model)
    assert type(converted["emb"]) is bte.ETPEmbedding
    assert _same(jax.vmap(converted["emb"])(IDS[0]), jax.vmap(stock)(IDS[0]))
    back = bte.to_eqx(converted)
    assert type(back["emb"]) is eqx.nn.Embedding and _same(back["emb"].weight, stock.weight)
    with pytest.raises(TypeError, match=r"ETPEmbedding\(6, 3\): x must be an integer id"):
        twin(jnp.array(1.0))


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw",
    [
        dict(in_features=3, out_features=(2, 4)),
        dict(in_features=(5, 3), out_features=4, axis=(-2, -1)),
        dict(in_features=3, out_features=4, batch_axis={0: 2}),  # kernel per batch entry
    ],
)
def test_nnx_linear_general_twin(kw):
    layer = nnx.LinearGeneral(**kw, rngs=nnx.Rngs(0))
    y_ref, state = layer(X32), nnx.state(layer)
    assert _same(nnx.state(btnnx.ETPLinearGeneral(**kw, rngs=nnx.Rngs(0))), state)
    btnnx.convert(layer)
    assert type(layer) is btnnx.ETPLinearGeneral and nnx.state(layer) == state
    assert _same(layer(X32), y_ref) and _etp_prims(layer, X32)


# -- D-RTRL against BPTT, one model per face ---------------------------------------------------


def _lif(h, y):
    i = 0.8 * h["i"] + y
    v = 0.7 * h["v"] * (1.0 - spike(h["v"] - 1.0)) + 0.3 * i
    return {"i": i, "v": v}


class LinenCell(nn.Module):
    """Stock ``nn.Embed`` and ``nn.DenseGeneral`` (converted) into one LIF membrane."""

    @nn.compact
    def __call__(self, h, x):
        y = nn.Embed(V, F, param_dtype=jnp.float64)(x["ids"])
        y = y + nn.DenseGeneral(F, param_dtype=jnp.float64)(x["f"])
        new = _lif(h, y)
        return new, jnp.tanh(new["v"]).sum(-2)


def _data(lead):
    ids = jnp.array([[[1, 4], [2, 1]], [[1, 1], [0, 2]], [[3, 4], [1, 5]], [[1, 0], [2, 2]]])
    feats = jax.random.normal(jax.random.PRNGKey(2), (T, B, L, I))
    xs = {"ids": ids, "f": feats}
    if lead == ():
        xs = {"ids": ids[:, 0], "f": feats[:, 0]}
    targets = jax.random.normal(jax.random.PRNGKey(3), (T,) + lead + (F,))
    hidden = {"i": jnp.zeros(lead + (L, F)), "v": jnp.full(lead + (L, F), 0.5)}
    return xs, targets, hidden


def mse(out, target):
    return jnp.sum((out - target) ** 2)


def _check(learner, step, params, hidden, xs, targets, batched):
    state = learner.init(params, hidden, jax.tree_util.tree_map(lambda a: a[0], xs))
    _, grads, _ = jax.jit(learner.scan)(params, state, xs, targets)
    ref = bptt_grad(step, mse, params, hidden, xs, targets, batched)
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
        assert rel_err(got, want) < EXACT


def test_linen_convert_dense_d_rtrl_equals_bptt():
    xs, targets, hidden = _data((B,))
    cell = LinenCell()
    x0 = jax.tree_util.tree_map(lambda a: a[0], xs)
    params = cell.init(jax.random.key(1), hidden, x0)["params"]
    learner = btf.compile(cell, mse, bt.D_RTRL(), convert_dense=True)
    report = learner.report(params, hidden, x0)
    for path in ("['Embed_0']['embedding']", "['DenseGeneral_0']['kernel']"):
        assert (report.param(path).mode, report.param(path).gradient) == ("trace", "exact")

    def step(p, h, x):
        with btf.etp_dense_calls():
            return cell.apply({"params": p}, h, x)

    _check(learner, step, params, hidden, xs, targets, True)


class NNXCell(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(V, F, param_dtype=jnp.float64, rngs=rngs)
        self.ein = nnx.Einsum("bli,io->blo", (I, F), (F,), param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, h, x):
        new = _lif(h, self.emb(x["ids"]) + self.ein(x["f"]))
        return new, jnp.tanh(new["v"]).sum(-2)


@pytest.mark.slow
def test_nnx_convert_d_rtrl_equals_bptt():
    xs, targets, hidden = _data((B,))
    model = btnnx.convert(NNXCell(nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)

    def step(p, h, x):
        return nnx.merge(graphdef, p)(h, x)

    learner = bt.compile(step, mse, bt.D_RTRL(), batched=True)
    _check(learner, step, params, hidden, xs, targets, True)


@pytest.mark.slow
def test_eqx_embedding_d_rtrl_equals_bptt():
    xs, targets, hidden = _data(())
    emb = bte.ETPEmbedding(V, F, dtype=jnp.float64, key=jax.random.PRNGKey(0))

    def step(p, h, x):
        new = _lif(h, jax.vmap(p)(x["ids"]))
        return new, jnp.tanh(new["v"]).sum(-2)

    learner = bt.compile(step, mse, bt.D_RTRL(), batched=False)
    _check(learner, step, emb, hidden, xs, targets, False)
