"""Model definitions used by the memory estimator, the benchmarks and the training app.

Models here know nothing about parallelism: the training app applies a strategy afterwards.
"""

from coap_dist.models.llama import LLAMA_PRESETS, Llama, LlamaConfig

__all__ = ["LLAMA_PRESETS", "Llama", "LlamaConfig"]
