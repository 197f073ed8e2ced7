"""The training app: ``python -m coap_dist.train`` (Hydra; see ``coap_dist/configs``).

Modules: :mod:`~coap_dist.train.config` (validated config), :mod:`~coap_dist.train.data`
(packaged corpus and memmap loader), :mod:`~coap_dist.train.parallelize` (strategies),
:mod:`~coap_dist.train.loop` (the loop), :mod:`~coap_dist.train.checkpoint` (save/resume),
:mod:`~coap_dist.train.loggers` and :mod:`~coap_dist.train.report` (outputs),
:mod:`~coap_dist.train.app` (the job). Importing this package imports none of them.
"""
