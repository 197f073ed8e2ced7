"""Optimizer construction per kind: COAP's parameter grouping, GaLore/APOLLO groups (a stand-in
module where the package is missing, a real run where it is installed), DeepSpeed JSON."""

from __future__ import annotations

import math
import sys
import types
from typing import Any

import pytest
import torch

from coap_dist.models.llama import LLAMA_PRESETS, Llama
from coap_dist.train.app import run
from coap_dist.train.config import TrainConfig
from coap_dist.train.optim import build_optimizer, deepspeed_optimizer_config, state_bytes

from .conftest import FAST, compose_dict


def optimizer_cfg(name: str) -> Any:
    return TrainConfig.from_dict(compose_dict([f"optimizer={name}"])).optimizer


class Recorder(torch.optim.SGD):
    """Stands in for GaLoreAdamW / APOLLOAdamW: keeps the groups and kwargs it was given."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        self.kwargs = kwargs
        super().__init__(params, lr=kwargs["lr"])


@pytest.mark.parametrize(
    ("name", "module", "cls", "extra"),
    [
        (
            "galore",
            "galore_torch",
            "GaLoreAdamW",
            {"rank", "update_proj_gap", "scale", "proj_type"},
        ),
        (
            "apollo",
            "apollo_torch",
            "APOLLOAdamW",
            {"rank", "update_proj_gap", "scale", "proj", "scale_type", "proj_type"},
        ),
    ],
)
def test_low_rank_baselines_get_the_matrices(monkeypatch, name, module, cls, extra) -> None:
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(**{cls: Recorder}))
    model = Llama(LLAMA_PRESETS["tiny"])
    opt = build_optimizer(model, optimizer_cfg(name))
    low_rank, plain = opt.param_groups
    assert extra <= set(low_rank) and not extra & set(plain)
    assert all(p.ndim == 2 for p in low_rank["params"])
    plain_ids = {id(p) for p in plain["params"]}
    assert {id(model.tok_embeddings.weight), id(model.output.weight)} <= plain_ids
    assert set(opt.kwargs) == {"lr", "betas", "eps", "weight_decay"}


def test_missing_baseline_package_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "galore_torch", None)
    with pytest.raises(ImportError, match="needs the package galore-torch"):
        build_optimizer(Llama(LLAMA_PRESETS["tiny"]), optimizer_cfg("galore"))


@pytest.mark.parametrize("name", ["coap", "coap_8bit", "coap_adafactor", "adamw"])
def test_builtin_optimizers_build_and_step(name: str) -> None:
    torch.manual_seed(0)
    model = Llama(LLAMA_PRESETS["tiny"])
    opt = build_optimizer(model, optimizer_cfg(name))
    model(torch.randint(0, 256, (2, 16))).float().pow(2).mean().backward()
    opt.step()
    assert state_bytes(opt) > 0


def test_deepspeed_optimizer_entries() -> None:
    coap = deepspeed_optimizer_config(optimizer_cfg("coap"), cpu=True)
    assert coap["type"] == "COAP" and coap["params"]["rank_ratio"] == 4
    assert coap["params"]["betas"] == [0.9, 0.999]
    assert deepspeed_optimizer_config(optimizer_cfg("coap_adafactor"), cpu=False)["type"] == (
        "COAPAdafactor"
    )
    adamw = deepspeed_optimizer_config(optimizer_cfg("adamw"), cpu=True)
    assert adamw == {
        "type": "AdamW",
        "params": {
            "lr": 3e-3,
            "betas": [0.9, 0.999],
            "eps": 1e-6,
            "weight_decay": 0.0,
            "torch_adam": True,
        },
    }


@pytest.mark.parametrize(
    ("name", "module"), [("galore", "galore_torch"), ("apollo", "apollo_torch")]
)
def test_installed_baselines_train(name: str, module: str, tmp_path) -> None:
    pytest.importorskip(module)
    (result,) = run(compose_dict([*FAST, f"optimizer={name}", "compare=false"]), tmp_path)
    assert math.isfinite(result.val_loss)
