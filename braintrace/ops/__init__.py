"""Built-in ETP ops: dense, LoRA and elementwise, each with its four rules."""

from .dense import WEIGHT_LAYOUTS, dense, etp_mm, etp_mv
from .elemwise import elemwise, etp_elemwise
from .lora import etp_lora_mm, etp_lora_mv, lora

__all__ = [
    "dense",
    "lora",
    "elemwise",
    "etp_mv",
    "etp_mm",
    "etp_lora_mv",
    "etp_lora_mm",
    "etp_elemwise",
    "WEIGHT_LAYOUTS",
]
