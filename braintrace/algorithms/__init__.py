"""Online learning algorithms (D-RTRL, ES-D-RTRL / pp_prop, SnAp-1, RTRL, UORO), OneStep,
BPTT and the learner."""

from .base import Algorithm, LearnerState, NoTraces, OnlineAlgorithm, Signals
from .bptt import BPTT, OneStep
from .d_rtrl import D_RTRL, DRTRLTraces
from .face import FaceLearner, ModelSplit, Splitter
from .learner import Learner, compile
from .named import ALGORITHM_NAMES, algorithm_by_name
from .pp_prop import ES_D_RTRL, PPTraces, pp_prop
from .rtrl import RTRL, RTRLTraces
from .snap import SnAp1
from .uoro import UORO, UOROTraces

__all__ = [
    "Algorithm",
    "OnlineAlgorithm",
    "LearnerState",
    "NoTraces",
    "Signals",
    "D_RTRL",
    "DRTRLTraces",
    "ES_D_RTRL",
    "PPTraces",
    "pp_prop",
    "SnAp1",
    "RTRL",
    "RTRLTraces",
    "UORO",
    "UOROTraces",
    "BPTT",
    "OneStep",
    "Learner",
    "FaceLearner",
    "ModelSplit",
    "Splitter",
    "compile",
    "ALGORITHM_NAMES",
    "algorithm_by_name",
]
