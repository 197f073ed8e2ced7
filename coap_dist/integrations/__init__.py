"""Optional integrations with third-party frameworks, each imported lazily and only when used:
``coap_dist.integrations.wandb`` (metrics logging for the training app),
``coap_dist.integrations.deepspeed`` (COAP as a DeepSpeed JSON-config optimizer),
``coap_dist.integrations.hf`` (HF Trainer checkpoints of sharded state) and
``coap_dist.integrations.accelerate`` (accelerate's ``save_state`` of sharded state).
Importing this package imports none of them."""
