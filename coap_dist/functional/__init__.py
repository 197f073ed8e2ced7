"""Pure COAP math on local tensors: no optimizer state, no collectives.

Functions that need sums over a row-sharded matrix take a ``ShardGroup`` of callbacks (None in one
process); see :mod:`coap_dist.functional.projection` for the canonical orientation used here.
"""

from coap_dist.functional import adam, projection, quant, tucker

__all__ = ["adam", "projection", "quant", "tucker"]
