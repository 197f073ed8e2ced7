"""The user routes through accelerate and the HF Trainer, run by ``torchrun`` on 2 CPU
processes (launched by tests/integrations/test_hf.py; writes ``results.json``).

1. accelerate FSDP2: ``COAPAdamW(model.parameters())`` built BEFORE
   ``accelerator.prepare(model, opt)`` swaps in the sharded parameters; against one process.
2. HF Trainer with ``fsdp_config={"fsdp_version": 2}``: the Trainer builds COAP from
   ``optimizer_cls_and_kwargs`` before wrapping; saves a DCP checkpoint at step 2; resuming
   from it ends where the uninterrupted run does.
3. HF Trainer with DDP and ``sharding="owner"`` and :class:`COAPCheckpointCallback`: the
   main-process checkpoint holds the whole state and resuming ends where the uninterrupted
   run does. (Without the callback the main process's ``optimizer.state_dict()`` raises at
   once, without entering a collective: tests/distributed/test_owner.py.)
5. FSDP2 ``FULL_STATE_DICT`` (torch gathers DTensors only; COAP gathers its own state when
   torch's full-state gather asks): accelerate ``save_state`` / ``load_state`` under the owner
   layout and under the default layout with 8-bit state (rows cut on quantization blocks),
   and the HF Trainer (owner layout, 8-bit), with no callback or hook: the file holds every
   parameter's single-process state and the resumed run ends bitwise where the
   uninterrupted one does.
4. accelerate DDP with ``sharding="owner"``: ``save_state`` without
   :func:`~coap_dist.integrations.accelerate.consolidate_on_save_state` stops at once on
   every rank, naming it; with it the saved optimizer file holds the whole state,
   ``load_state`` into a fresh model and optimizer continues bitwise, and the same file
   loaded into ONE process (sharding=None, the whole batch) continues to fp tolerance.

Shim (CPU only): accelerate turns FSDP on only for GPU-like distributed types (MULTI_GPU,
MULTI_NPU, ...), so on CPU it keeps MULTI_CPU and drops the plugin. :func:`_force_fsdp` sets
``distributed_type = FSDP`` and the plugin on the shared accelerator state (and the type on
the shared partial state), which is what accelerate itself does on a GPU node; nothing else
is changed.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import coap_dist
from coap_dist.integrations.accelerate import consolidate_on_save_state
from coap_dist.integrations.hf import COAPCheckpointCallback, coap_optimizer

KW = dict(lr=1e-2, rank=4, update_interval=2, reproject_factor=2)
OUT = sys.argv[1]
RANK = int(os.environ["RANK"])


def _force_fsdp(state: AcceleratorState, plugin: FullyShardedDataParallelPlugin) -> None:
    """The CPU shim of the module docstring."""
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    # (AcceleratorState copies PartialState's type each time it is built, so accelerate
    # sets it there too when it turns FSDP on)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _reset() -> None:
    AcceleratorState._reset_state(reset_partial_state=False)
    if PartialState._shared_state.get("distributed_type") == DistributedType.FSDP:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU


def accelerate_fsdp2() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 24), nn.LayerNorm(24), nn.Linear(24, 4)
    )
    ref = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 24), nn.LayerNorm(24), nn.Linear(24, 4)
    )
    ref.load_state_dict(model.state_dict())
    opt = coap_dist.COAPAdamW(model.parameters(), **KW)  # before prepare
    ref_opt = coap_dist.COAPAdamW(
        ref.parameters(), **KW
    )  # the same side rule (24 x 32, 4 x 24: left)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)
    acc = Accelerator(fsdp_plugin=plugin, cpu=True)
    _force_fsdp(acc.state, plugin)
    model, opt = acc.prepare(model, opt)
    diffs = []
    for step in range(6):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        half = x[4 * RANK : 4 * RANK + 4]
        acc.backward(model(half).square().mean())
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            q.grad = p.grad.full_tensor()
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
        diffs.append(
            max(
                float((p.full_tensor() - q).abs().max())
                for p, q in zip(model.parameters(), ref.parameters(), strict=True)
            )
        )
    inner = coap_optimizer(opt)
    out = {
        "layout": inner.layout.name,
        "refreshes": inner.metrics()["optim/refreshes"],
        "max_diff": max(diffs),
    }
    _reset()
    return out


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


class _CpuFsdpTrainer(Trainer):
    """HF Trainer with the CPU shim applied to the accelerator it creates."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        _force_fsdp(
            self.accelerator.state, FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        )
        self.is_fsdp_enabled = True


def _args(
    out: str, fsdp: bool, sd_type: str = "SHARDED_STATE_DICT", **over: Any
) -> TrainingArguments:
    extra: dict[str, Any] = {}
    if fsdp:
        extra = dict(
            fsdp="full_shard",
            fsdp_config={
                "fsdp_version": 2,
                "reshard_after_forward": True,
                "state_dict_type": sd_type,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            },
        )
    settings: dict[str, Any] = dict(
        output_dir=out,
        use_cpu=True,
        per_device_train_batch_size=4,
        max_steps=4,
        save_steps=2,
        save_strategy="steps",
        logging_steps=1,
        report_to=[],
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        dataloader_num_workers=0,
        seed=0,
    )
    return TrainingArguments(**{**settings, **extra, **over})


def _train(
    out: str,
    fsdp: bool,
    kwargs: dict,
    callbacks: list,
    resume: str | None = None,
    sd_type: str = "SHARDED_STATE_DICT",
    **over: Any,
) -> dict:
    cls = _CpuFsdpTrainer if fsdp else Trainer
    trainer = cls(
        model=_llama(),
        args=_args(out, fsdp, sd_type, **over),
        train_dataset=_Tokens(),
        eval_dataset=_Tokens() if "eval_strategy" in over else None,
        optimizer_cls_and_kwargs=(coap_dist.COAPAdamW, kwargs),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    inner = coap_optimizer(trainer.optimizer)
    if fsdp:
        weights = {n: p.full_tensor() for n, p in trainer.model.named_parameters()}
    else:
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out_d = {"layout": inner.layout.name, "losses": losses, "weights": weights}
    _reset()
    return out_d


def trainer_fsdp2(kw: dict, sd_type: str = "SHARDED_STATE_DICT") -> dict:
    out = os.path.join(OUT, f"fsdp2_{sd_type}")
    full = _train(out, True, kw, [], sd_type=sd_type)
    resume = os.path.join(out, "checkpoint-2")
    resumed = _train(out + "_resumed", True, kw, [], resume=resume, sd_type=sd_type)
    same = all(torch.equal(full["weights"][n], w) for n, w in resumed["weights"].items())
    out_d = {
        "layout": full["layout"],
        "resumed_equal": same,
        "losses": full["losses"],
        "resumed_losses": resumed["losses"],
    }
    if sd_type == "FULL_STATE_DICT":  # one file: the single-process state
        saved = torch.load(os.path.join(resume, "optimizer.bin"), weights_only=True)
        out_d["saved_params"] = len(saved["state"])
        out_d["params"] = sum(1 for _ in _llama().parameters())
    return out_d


def trainer_ddp_owner() -> dict:
    kw = dict(KW, sharding="owner")
    out = os.path.join(OUT, "ddp")
    full = _train(out, False, kw, [COAPCheckpointCallback()])
    saved = torch.load(os.path.join(out, "checkpoint-2", "optimizer.pt"), weights_only=True)
    resumed = _train(
        out + "_resumed",
        False,
        kw,
        [COAPCheckpointCallback()],
        resume=os.path.join(out, "checkpoint-2"),
    )
    same = all(torch.equal(full["weights"][n], w) for n, w in resumed["weights"].items())
    n_params = sum(1 for _ in _llama().parameters())
    # Saves the Trainer decides at an epoch's end and after an evaluation (a new best).
    other: dict[str, int] = {}
    for strategy, over in [
        ("epoch", {}),
        ("best", dict(eval_strategy="steps", eval_steps=2, metric_for_best_model="loss")),
    ]:
        folder = os.path.join(OUT, f"ddp_{strategy}")
        _train(folder, False, kw, [COAPCheckpointCallback()], save_strategy=strategy, **over)
        first = sorted(os.listdir(folder))[0]
        sd = torch.load(os.path.join(folder, first, "optimizer.pt"), weights_only=True)
        other[strategy] = len(sd["state"])
    return {
        "layout": full["layout"],
        "saved_params": len(saved["state"]),
        "params": n_params,
        "resumed_equal": same,
        "saved_params_by_strategy": other,
    }


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 24), nn.Linear(24, 4))


def _steps(model: nn.Module, opt: Any, steps: range, backward: Any, whole: bool = False) -> None:
    for step in steps:
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        backward(model(x if whole else x[4 * RANK : 4 * RANK + 4]).square().mean())
        opt.step()
        opt.zero_grad()


def accelerate_ddp_owner() -> dict:
    out = os.path.join(OUT, "acc_ddp")
    kw = dict(KW, sharding="owner", state_bits=8)
    acc = Accelerator(cpu=True)
    model = _mlp()
    model, opt = acc.prepare(model, coap_dist.COAPAdamW(model.parameters(), **kw))
    _steps(model, opt, range(3), acc.backward)
    try:
        acc.save_state(out + "_refused")
        refusal = ""
    except RuntimeError as e:
        refusal = str(e)
    handle = consolidate_on_save_state(acc, opt)
    acc.save_state(out)
    acc.wait_for_everyone()
    _steps(model, opt, range(3, 6), acc.backward)
    full = [p.detach().clone() for p in model.parameters()]
    handle.remove()
    _reset()
    acc = Accelerator(cpu=True)
    model = _mlp()
    model, opt = acc.prepare(model, coap_dist.COAPAdamW(model.parameters(), **kw))
    acc.load_state(out)
    _steps(model, opt, range(3, 6), acc.backward)
    resumed = [p.detach().clone() for p in model.parameters()]
    _reset()
    saved = torch.load(os.path.join(out, "optimizer.bin"), weights_only=True)
    one = _mlp()  # one process, whole batch: the saved weights and optimizer state
    from safetensors.torch import load_file

    one.load_state_dict(
        {
            k.removeprefix("module."): v
            for k, v in load_file(os.path.join(out, "model.safetensors")).items()
        }
    )
    one_opt = coap_dist.COAPAdamW(one.parameters(), **dict(kw, sharding=None))
    one_opt.load_state_dict(saved)
    _steps(one, one_opt, range(3, 6), lambda loss: loss.backward(), whole=True)
    return {
        "refusal": refusal,
        "saved_params": len(saved["state"]),
        "params": len(full),
        "resumed_equal": all(torch.equal(a, b) for a, b in zip(full, resumed, strict=True)),
        "one_process_diff": max(
            float((a - b).abs().max()) for a, b in zip(full, one.parameters(), strict=True)
        ),
    }


def accelerate_fsdp2_full(kw: dict) -> dict:
    """save_state / load_state with FULL_STATE_DICT, nothing else added: torch's full-state
    gather calls state_dict() on every rank, where COAP gathers its whole state itself."""
    tag = "owner" if kw.get("sharding") else "default"
    out = os.path.join(OUT, f"acc_fsdp2_full_{tag}")

    def prepared() -> tuple[Accelerator, nn.Module, Any]:
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, reshard_after_forward=True, state_dict_type="FULL_STATE_DICT"
        )
        acc = Accelerator(fsdp_plugin=plugin, cpu=True)
        _force_fsdp(acc.state, plugin)
        model = _mlp()
        model, opt = acc.prepare(model, coap_dist.COAPAdamW(model.parameters(), **kw))
        return acc, model, opt

    acc, model, opt = prepared()
    _steps(model, opt, range(3), acc.backward)
    acc.save_state(out)
    acc.wait_for_everyone()
    _steps(model, opt, range(3, 6), acc.backward)
    full = [p.full_tensor() for p in model.parameters()]
    layout = coap_optimizer(opt).layout.name
    _reset()
    acc, model, opt = prepared()
    acc.load_state(out)
    _steps(model, opt, range(3, 6), acc.backward)
    resumed = [p.full_tensor() for p in model.parameters()]
    _reset()
    saved = torch.load(os.path.join(out, "optimizer.bin"), weights_only=True)
    return {
        "layout": layout,
        "saved_params": len(saved["state"]),
        "params": len(full),
        "resumed_equal": all(torch.equal(a, b) for a, b in zip(full, resumed, strict=True)),
    }


def main() -> None:
    results = {"accelerate_fsdp2": accelerate_fsdp2()}
    results["accelerate_ddp_owner"] = accelerate_ddp_owner()
    # FULL_STATE_DICT: the owner layout's pieces; the default layout's 8-bit rows (on blocks)
    results["accelerate_fsdp2_full_owner"] = accelerate_fsdp2_full(dict(KW, sharding="owner"))
    results["accelerate_fsdp2_full_default"] = accelerate_fsdp2_full(dict(KW, state_bits=8))
    results["trainer_fsdp2"] = trainer_fsdp2(dict(KW))
    results["trainer_fsdp2_full"] = trainer_fsdp2(
        dict(KW, sharding="owner", state_bits=8), "FULL_STATE_DICT"
    )
    results["trainer_ddp_owner"] = trainer_ddp_owner()
    if RANK == 0:
        with open(os.path.join(OUT, "results.json"), "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
