"""windquant: mixed-precision ultra-low-bit quantization of causal LLMs under one bit budget."""

from windquant.alloc.plan import Plan
from windquant.config import QuantConfig
from windquant.errors import WindquantError
from windquant.pack.checkpoint import load, save
from windquant.pipeline import quantize_

__version__ = "0.1.0"
__all__ = ["Plan", "QuantConfig", "WindquantError", "load", "quantize_", "save"]
