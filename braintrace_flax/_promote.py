"""The one compute dtype of a custom ``promote_dtype``, shared by the linen and NNX layers.

An ETP op computes in a single dtype, so a layer can honour a user's
``promote_dtype`` only if it casts: the same shapes back, one dtype for all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp


def single_dtype(who: str, promoted: Sequence[Any], arrays: Sequence[Any]) -> Any:
    """The dtype of ``promoted`` (``promote_dtype``'s abstract result for ``arrays``;
    ``None`` entries skipped), or a ``ValueError`` naming ``who`` and the fix."""
    got = [o for o in promoted if o is not None]
    want = [a for a in arrays if a is not None]
    if [tuple(o.shape) for o in got] != [tuple(jnp.shape(a)) for a in want]:
        raise ValueError(
            f"{who}: promote_dtype changed the shape of its arguments; the ETP op can only "
            "honour a promote_dtype that casts (leave promote_dtype at its default)."
        )
    kinds = {jnp.dtype(o.dtype) for o in got}
    if len(kinds) != 1:
        raise ValueError(
            f"{who}: promote_dtype returned mixed dtypes {sorted(map(str, kinds))}; the ETP "
            "op computes in one dtype. Return one dtype for all its arguments, or leave "
            "promote_dtype at its default."
        )
    return kinds.pop()
