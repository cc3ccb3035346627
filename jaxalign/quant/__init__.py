"""NF4 quantization (QLoRA), byte-compatible with bitsandbytes."""

from jaxalign.quant.bnb_checkpoint import (
    BnbCheckpointError,
    bnb_quantization_config,
    is_bnb_nf4,
    load_nf4_kernel,
    nf4_kernel_state,
)
from jaxalign.quant.bnb_io import bnb_state_to_nf4, nf4_to_bnb_state
from jaxalign.quant.nf4 import (
    NF4_CODE,
    NF4Tensor,
    as_dense,
    dequantize_absmax,
    dequantize_nf4,
    dynamic_map,
    quantize_nf4,
)
from jaxalign.quant.nf4_matmul import nf4_matmul
from jaxalign.quant.params import (
    DEFAULT_TARGETS,
    bits_per_parameter,
    dequantize_params,
    quantize_params,
    quantized_bits,
)

__all__ = [
    "DEFAULT_TARGETS",
    "NF4_CODE",
    "BnbCheckpointError",
    "NF4Tensor",
    "as_dense",
    "bits_per_parameter",
    "bnb_quantization_config",
    "bnb_state_to_nf4",
    "dequantize_absmax",
    "dequantize_nf4",
    "dequantize_params",
    "dynamic_map",
    "is_bnb_nf4",
    "load_nf4_kernel",
    "nf4_kernel_state",
    "nf4_matmul",
    "nf4_to_bnb_state",
    "quantize_nf4",
    "quantize_params",
    "quantized_bits",
]
