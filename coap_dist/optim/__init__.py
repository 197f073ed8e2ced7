"""COAP optimizers (single-process math; distribution comes through a Layout)."""

from coap_dist.optim.coap import COAPAdafactor, COAPAdamW
from coap_dist.optim.config import COAPAdafactorConfig, COAPAdamWConfig
from coap_dist.optim.params import param_groups

__all__ = ["COAPAdafactor", "COAPAdafactorConfig", "COAPAdamW", "COAPAdamWConfig", "param_groups"]
