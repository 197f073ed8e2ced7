"""Optional integrations with third-party frameworks, each imported lazily and only when used:
``coap_dist.integrations.wandb`` (metrics logging for the training app) and
``coap_dist.integrations.deepspeed`` (COAP as a DeepSpeed JSON-config optimizer). Importing
this package imports none of them."""
