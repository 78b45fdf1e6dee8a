"""Built-in ETP ops: dense, LoRA and elementwise, each with its four rules."""

from .conv import conv, etp_conv, etp_conv_batched
from .dense import WEIGHT_LAYOUTS, dense, etp_mm, etp_mv
from .einsum import einsum, etp_einsum, etp_einsum_batched
from .elemwise import elemwise, etp_elemwise
from .embed import embed, etp_embed, etp_embed_batched
from .grouped import etp_grouped_mm, etp_grouped_mv, grouped_dense
from .lora import etp_lora_mm, etp_lora_mv, lora
from .sparse import SparsePattern, etp_sparse_mm, etp_sparse_mv, sparse_dense

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
    "conv",
    "etp_conv",
    "etp_conv_batched",
    "grouped_dense",
    "etp_grouped_mv",
    "etp_grouped_mm",
    "sparse_dense",
    "SparsePattern",
    "etp_sparse_mv",
    "etp_sparse_mm",
    "embed",
    "etp_embed",
    "etp_embed_batched",
    "einsum",
    "etp_einsum",
    "etp_einsum_batched",
]
