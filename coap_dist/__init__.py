"""coap_dist: COAP (correlation-aware low-rank projected Adam/Adafactor) for distributed training.

``COAPAdamW`` / ``COAPAdafactor`` replace ``torch.optim.AdamW``; ``param_groups(model)`` routes
embeddings, heads, norms and biases to AdamW. Importing the package installs the distribution
layouts (FSDP2 row shards are detected automatically; ``sharding="owner"`` shards state over
DDP ranks; ``optimizer_in_backward`` steps inside the backward pass) and makes ``torch.optim.COAP`` resolvable for DeepSpeed's JSON config.
"""

from coap_dist import distributed as distributed  # installs the layout resolver
from coap_dist.distributed.in_backward import InBackward, optimizer_in_backward
from coap_dist.integrations.deepspeed import register as _register_deepspeed
from coap_dist.optim import (
    COAPAdafactor,
    COAPAdafactorConfig,
    COAPAdamW,
    COAPAdamWConfig,
    param_groups,
)

_register_deepspeed()  # torch.optim.COAP / COAPAdafactor; does not import deepspeed

__version__ = "0.1.0"
__all__ = [
    "COAPAdafactor",
    "COAPAdafactorConfig",
    "COAPAdamW",
    "COAPAdamWConfig",
    "InBackward",
    "__version__",
    "optimizer_in_backward",
    "param_groups",
]
