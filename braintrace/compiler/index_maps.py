"""Index maps: an ETP output that reaches a group through element-moving operations.

A fused-gate cell computes one ``3H``-wide output and slices it into gates; each
element of that output still reaches at most one position of the hidden group, so
the relation stays exact if ``D_f`` is taken per element of ``y`` and the learning
signal and ``D`` are gathered through the map ``p: element -> position``
(``docs/algorithms.md``, "Index maps"). This module finds ``p`` by running the
program's movers on integer element ids (ids of ``y``, ``-1`` for none), checks
that no element reaches two positions, and colours the elements into *classes*
(no two elements of a class reach the same position), one tangent direction each.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import registry
from . import program as prog
from .eqns import sub_jaxprs
from .paths import ELEMENTWISE, MOVERS, WITH_BODY

__all__ = ["fold_constants", "element_positions", "per_sample_map", "colour", "take_mapped"]

#: Constants larger than this are not folded (their values are never index operands).
_MAX_FOLD = 1 << 16


def fold_constants(program: prog.Program) -> dict:
    """Value id -> value for every small value computable from constants alone."""
    known: dict = {}

    def value(atom):
        return atom.value if isinstance(atom, prog.Const) else known.get(atom)

    for node in program.nodes:
        if sub_jaxprs(node.params) or node.primitive.name in WITH_BODY:
            continue
        inputs = [value(a) for a in node.inputs]
        if any(v is None for v in inputs) or any(
            np.size(program.avals[o]) > _MAX_FOLD for o in node.outputs
        ):
            continue
        try:
            with jax.ensure_compile_time_eval():  # eager even inside the caller's jit
                outs = prog.bind(node.primitive, node.params, [np.asarray(v) for v in inputs])
        except Exception:  # noqa: BLE001 - not foldable here: treated as not constant
            continue
        outs = outs if node.primitive.multiple_results else [outs]
        known.update((o, np.asarray(v)) for o, v in zip(node.outputs, outs))
    return known


def _as_ids(layer, shape) -> np.ndarray:
    return np.broadcast_to(np.asarray(layer), shape)


def _elementwise(node, ins: list, out_shape) -> list:
    """The union of the operands' id layers (identical layers once)."""
    layers: list = []
    for operand in ins:
        for layer in operand or ():
            layer = _as_ids(layer, out_shape)
            if not any(np.array_equal(layer, seen) for seen in layers):
                layers.append(layer)
    return layers


def _operand(node, j: int, layers, m: int, constants: dict, program):
    """Operand ``j`` of a mover for id layer ``m``: ids, ``-1`` fill, or a constant."""
    name, atom = node.primitive.name, node.inputs[j]
    if layers:
        return layers[m] if m < len(layers) else np.full_like(layers[0], -1)
    if j == 0 or name == "concatenate":
        return np.full(program.aval_of(atom).shape, -1, np.int32)
    if name == "pad":
        return np.asarray(-1, np.int32)
    return atom.value if isinstance(atom, prog.Const) else constants[atom]


def _move(node, ins: list, constants: dict, program) -> list:
    """Apply a mover to each id layer (operands without ids filled with ``-1``)."""
    depth = max(len(layers) for layers in ins if layers)
    results = []
    for m in range(depth):
        operands = [_operand(node, j, ins[j], m, constants, program) for j in range(len(ins))]
        with jax.ensure_compile_time_eval():  # eager even inside the caller's jit
            out = prog.bind(node.primitive, node.params, operands)
        results.append(out if node.primitive.multiple_results else [out])
    return [[np.asarray(r[k]) for r in results] for k in range(len(node.outputs))]


def _transfer_ids(node, ins, constants, program) -> list:
    """Id layers of each of ``node``'s results (``None``: no ids)."""
    name = node.primitive.name
    out_shapes = [tuple(program.avals[o].shape) for o in node.outputs]
    if name in MOVERS:
        return _move(node, ins, constants, program)
    if name == "select_n":
        ins = [None] + list(ins[1:])
    if name in ELEMENTWISE or name in WITH_BODY or name == "select_n":
        if name in WITH_BODY and any(s != out_shapes[0] for s in out_shapes):
            return [None] * len(out_shapes)
        return [_elementwise(node, ins, shape) or None for shape in out_shapes]
    if name == "broadcast_in_dim":
        with jax.ensure_compile_time_eval():
            return [[np.asarray(prog.bind(node.primitive, node.params, [x])) for x in ins[0]]]
    return [None] * len(out_shapes)


def element_positions(
    graph_program, op_node: int, y_index: int, cut_nodes: dict, constants: dict, leaf_outputs: list
) -> dict:
    """Run ``y``'s element ids to the group's new-hidden leaves.

    Returns ``{leaf position in leaf_outputs: list of id layers}`` (ids of the
    flattened ``y``; ``-1`` where no element arrives).
    """
    program = graph_program
    start = program.nodes[op_node].outputs[y_index]
    y_shape = tuple(program.avals[start].shape)
    ids: dict[int, Any] = {
        start: [np.arange(int(np.prod(y_shape)), dtype=np.int32).reshape(y_shape)]
    }
    for index, node in enumerate(program.nodes):
        if index <= op_node:
            continue
        cut = cut_nodes.get(index, ())
        ins = [
            None if (j in cut or not isinstance(a, int)) else ids.get(a)
            for j, a in enumerate(node.inputs)
        ]
        if not any(ins):
            continue
        if registry.is_etp_primitive(node.primitive):
            outs = _etp_ids(node, ins)
        else:
            outs = _transfer_ids(node, ins, constants, program)
        for vid, layers in zip(node.outputs, outs):
            if layers:
                ids[vid] = [np.asarray(layer).astype(np.int32) for layer in layers]
    return {k: ids.get(atom) for k, atom in enumerate(leaf_outputs) if isinstance(atom, int)}


def _etp_ids(node, ins: list) -> list:
    """Another ETP op holds its output fixed; an identity-like one passes its input's ids."""
    outs: list = [None] * len(node.outputs)
    x_index = registry.get_x_invar_index(node.primitive)
    if registry.is_gradient_enabled(node.primitive) and x_index is not None and ins[x_index]:
        outs[registry.get_y_outvar_index(node.primitive)] = ins[x_index]
    return outs


def per_sample_map(
    layers_by_leaf: dict, y_shape: tuple, pos_shape: tuple, y_lead: int, pos_lead: int
) -> np.ndarray | str:
    """``p`` for one sample: per element of ``y`` (one sample), a flat position or ``-1``.

    ``y_lead``/``pos_lead`` are 1 where ``y`` / the group carry a leading batch
    axis. Returns a reason (``str``) when some element reaches two positions or a
    sample's elements reach another sample.
    """
    n_y, n_pos = int(np.prod(y_shape[y_lead:])), int(np.prod(pos_shape[pos_lead:]))
    where = np.full(int(np.prod(y_shape)), -1, np.int64)
    for layers in layers_by_leaf.values():
        for layer in layers or ():
            flat = np.asarray(layer).reshape(-1)
            for pos in np.nonzero(flat >= 0)[0]:
                element = flat[pos]
                if y_lead and pos_lead and element // n_y != pos // n_pos:
                    return "an output element reaches another sample's state"
                pos = pos % n_pos if pos_lead else pos
                if where[element] not in (-1, pos):
                    return "an output element reaches two positions of the group"
                where[element] = pos
    where = where.reshape((-1, n_y))
    if not (where == where[:1]).all():
        return "the map from output elements to positions differs between samples"
    return where[0]


def colour(maps: list, n_elements: int) -> np.ndarray:
    """A class per element so that no two elements of a class share a position in any map."""
    classes = np.zeros(n_elements, np.int64)
    taken: dict = {}
    for j in range(n_elements):
        c = 0
        while any(m[j] >= 0 and (k, c, m[j]) in taken for k, m in enumerate(maps)):
            c += 1
        classes[j] = c
        for k, m in enumerate(maps):
            if m[j] >= 0:
                taken[(k, c, m[j])] = j
    return classes


#: Above this many contiguous runs an index map is applied as one gather.
_MAX_RUNS = 32


def _runs(classes: np.ndarray, where: np.ndarray) -> list:
    """``(class, first position or -1, length)`` for each maximal run of elements that
    read consecutive positions of one class (or none: ``-1``)."""
    runs: list = []
    for c, p in zip(classes.tolist(), where.tolist()):
        if runs:
            rc, start, n = runs[-1]
            if rc == c and ((p < 0 and start < 0) or (p >= 0 and start >= 0 and p == start + n)):
                runs[-1] = (rc, start, n + 1)
                continue
        runs.append((c, p if p >= 0 else -1, 1))
    return runs


def take_mapped(sources: list, classes, where, axis: int):
    """Element ``j`` of the result, along ``axis``, is ``sources[classes[j]]`` at position
    ``where[j]`` (zero where ``where[j] < 0``); ``classes=None``: one source.

    A fused-gate map is a few contiguous runs (one per gate), so it is applied as
    slices and one concatenation, which XLA copies at memory speed; a scattered map
    falls back to one gather.
    """
    where = np.asarray(where)
    classes = np.zeros_like(where) if classes is None else np.asarray(classes)
    runs = _runs(classes, where)
    if len(runs) > _MAX_RUNS:
        return _gathered(sources, classes, where, axis)
    pieces = []
    for c, start, n in runs:
        src = sources[c]
        if start < 0:
            shape = src.shape[:axis] + (n,) + src.shape[axis + 1 :]
            pieces.append(jnp.zeros(shape, src.dtype))
        else:
            pieces.append(jax.lax.slice_in_dim(src, start, start + n, axis=axis))
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis)


def _gathered(sources: list, classes: np.ndarray, where: np.ndarray, axis: int):
    stacked = jnp.moveaxis(jnp.stack(sources), axis + 1, 1)  # (C, P, ...)
    picked = stacked[classes, np.maximum(where, 0)]  # (Y, ...)
    if (where < 0).any():
        reaches = (where >= 0).reshape((-1,) + (1,) * (picked.ndim - 1))
        picked = jnp.where(reaches, picked, 0)
    return jnp.moveaxis(picked, 0, axis)
