"""Online learning algorithms (D-RTRL, ES-D-RTRL / pp_prop), OneStep, BPTT and the learner."""

from .base import Algorithm, LearnerState, NoTraces, OnlineAlgorithm
from .bptt import BPTT, OneStep
from .d_rtrl import D_RTRL, DRTRLTraces
from .learner import Learner, compile
from .named import ALGORITHM_NAMES, algorithm_by_name
from .pp_prop import ES_D_RTRL, PPTraces, pp_prop

__all__ = [
    "Algorithm",
    "OnlineAlgorithm",
    "LearnerState",
    "NoTraces",
    "D_RTRL",
    "DRTRLTraces",
    "ES_D_RTRL",
    "PPTraces",
    "pp_prop",
    "BPTT",
    "OneStep",
    "Learner",
    "compile",
    "ALGORITHM_NAMES",
    "algorithm_by_name",
]
