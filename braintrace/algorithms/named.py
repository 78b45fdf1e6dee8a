"""Algorithms by name, for command lines and configs."""

from __future__ import annotations

from .base import Algorithm
from .bptt import BPTT, OneStep
from .d_rtrl import D_RTRL
from .pp_prop import ES_D_RTRL
from .rtrl import RTRL
from .snap import SnAp1
from .uoro import UORO

__all__ = ["ALGORITHM_NAMES", "algorithm_by_name"]

#: The names :func:`algorithm_by_name` accepts.
ALGORITHM_NAMES = ("d_rtrl", "pp_prop", "snap1", "rtrl", "uoro", "bptt", "one_step")


def algorithm_by_name(name: str, *, decay_or_rank=0.9) -> Algorithm:
    """An algorithm instance from its name (one of :data:`ALGORITHM_NAMES`).

    ``'es_d_rtrl'`` is accepted as an alias of ``'pp_prop'``.

    Parameters
    ----------
    name : str
        The algorithm's name (case-insensitive).
    decay_or_rank : float, int or pair
        pp_prop's ``decay_or_rank`` (ignored by the others).

    Examples
    --------
    >>> import braintrace as bt
    >>> bt.algorithm_by_name("pp_prop", decay_or_rank=0.5).alpha_f
    0.5
    """
    key = str(name).lower()
    if key == "d_rtrl":
        return D_RTRL()
    if key in ("pp_prop", "es_d_rtrl"):
        return ES_D_RTRL(decay_or_rank)
    if key == "snap1":
        return SnAp1()
    if key == "rtrl":
        return RTRL()
    if key == "uoro":
        return UORO()
    if key == "bptt":
        return BPTT()
    if key == "one_step":
        return OneStep()
    raise ValueError(f"unknown algorithm {name!r}; expected one of {ALGORITHM_NAMES}.")
