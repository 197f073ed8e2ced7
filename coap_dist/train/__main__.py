"""Train a LLaMA-style model with COAP (and compare it with AdamW): ``python -m
coap_dist.train`` or ``coap-train``.

Canonical commands::

    # CPU, a few minutes: tiny model on Shakespeare, COAP then AdamW, table + loss curves
    python -m coap_dist.train
    # one optimizer, another model, more steps
    python -m coap_dist.train optimizer=coap_8bit compare=false model=60m steps=2000
    # several processes on one machine (see launch/torchrun_local.sh)
    NPROC=4 launch/torchrun_local.sh strategy=fsdp2
    # checkpoint every 100 steps, then continue from one
    python -m coap_dist.train compare=false checkpoint.every=100
    python -m coap_dist.train compare=false resume=outputs/<day>/<time>/checkpoints/coap/step_0000100

Config groups (``coap_dist/configs``): model (tiny, 60m, 130m, 350m, 1b, 7b), optimizer (coap,
coap_8bit, coap_adafactor, adamw, galore, apollo), strategy (single, ddp, ddp_owner, fsdp2,
hsdp, deepspeed_zero0..3), data (shakespeare, memmap), logger (none, jsonl, wandb).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from coap_dist.train.config import ConfigError


@hydra.main(version_base="1.3", config_path="pkg://coap_dist.configs", config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (also the ``coap-train`` console script)."""
    from coap_dist.train.app import run

    hydra_cfg = HydraConfig.get()
    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        assert isinstance(config, dict)
        # the config's top-level keys are strings (a DictConfig from YAML)
        run(cast(dict[str, Any], config), Path(hydra_cfg.runtime.output_dir))
    except (ConfigError, OmegaConfBaseException) as err:
        print(f"coap_dist.train: invalid config: {err}", file=sys.stderr, flush=True)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # A sweep's launcher (basic, submitit, ...) reports an exception as the job's
            # failure; SystemExit would end a submitit task without a result to report.
            raise ConfigError(str(err)) from None
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
