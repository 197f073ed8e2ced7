"""Big models start sharded: on 2 gloo processes, every strategy's ``build_model`` allocates
nothing (meta device; DeepSpeed ZeRO-3: ``zero.Init`` partitions), ``setup`` materialises only
this rank's shards, and the weights are bitwise those of a one-process ``Llama(cfg, seed)``.
One spawn checks fsdp2, hsdp (2 x 1 mesh), ddp and deepspeed_zero3 in turn."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

from coap_dist.models.llama import Llama
from coap_dist.train.config import TrainConfig
from coap_dist.train.parallelize import DistEnv, build_strategy
from tests.dist_harness import run_workers

from .conftest import FAST, compose_dict

WORLD = 2


def _full_state(strategy, name: str) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if name.startswith("deepspeed"):
        import deepspeed

        params = dict(strategy.unwrapped.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {k: p.detach().clone() for k, p in params.items()}
    if name in ("fsdp2", "hsdp"):
        opts = StateDictOptions(full_state_dict=True)
        return get_model_state_dict(strategy.model, options=opts)
    return {k: v.detach().clone() for k, v in strategy.unwrapped.state_dict().items()}


def _worker(rank: int, world: int, strategies: list[str]) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu"
    )
    env = DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    for name in strategies:
        overrides = [*FAST, f"strategy={name}", "model.n_layers=2", "seed=7"]
        if name == "hsdp":
            overrides.append("strategy.replicate_degree=2")
        if name.startswith("deepspeed"):
            import deepspeed

            sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # gloo is enough
            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        cfg = TrainConfig.from_dict(compose_dict(overrides))
        strategy = build_strategy(cfg, env)
        model = strategy.build_model()
        if name.startswith("deepspeed"):  # partitioned at construction: no rank holds it all
            assert all(p.numel() == 0 for p in model.parameters()), name
        else:
            assert all(p.is_meta for p in model.parameters()), name
        strategy.setup(model, cfg.optimizer)
        local = sum(
            (p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)).numel()
            for p in strategy.unwrapped.parameters()
        )
        total = cfg.model.to_llama().num_params()
        sharded = name not in ("ddp", "hsdp")  # hsdp 2 x 1: replicated
        assert (local < 0.6 * total) if sharded else (local == total), (name, local, total)
        got = _full_state(strategy, name)
        expected = Llama(cfg.model.to_llama(), seed=7).state_dict()
        assert set(got) == set(expected), name
        for key, value in expected.items():
            assert torch.equal(got[key].float(), value), (name, key)
        dist.barrier()


@pytest.mark.distributed
def test_sharded_builds_start_from_the_one_process_weights() -> None:
    strategies = ["fsdp2", "hsdp", "ddp"]
    try:
        import deepspeed  # noqa: F401

        strategies.append("deepspeed_zero3")
    except ImportError:
        pass
    run_workers(_worker, WORLD, strategies)
