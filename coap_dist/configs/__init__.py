"""Hydra config tree of ``coap_dist.train`` (``train.yaml`` plus groups model, optimizer,
strategy, data, logger); a package so Hydra finds it as ``pkg://coap_dist.configs``."""
