"""Pure COAP math on local tensors: no optimizer state, no collectives.

Refreshes and Adafactor statistics of a matrix whose rows are split over ranks come as
``*_partials`` / ``*_from_sums`` pairs (the caller moves and sums the partials); see
:mod:`coap_dist.functional.projection` for the canonical orientation used here.
"""

from coap_dist.functional import adam, projection, quant, tucker

__all__ = ["adam", "projection", "quant", "tucker"]
