"""Config tree and validation: every combination meant to work composes and validates; bad
values fail early with a message naming the field."""

from __future__ import annotations

import dataclasses
import itertools
import re
import subprocess
import sys
from importlib import resources

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from coap_dist.models.llama import LLAMA_PRESETS
from coap_dist.train.config import ConfigError, TrainConfig

from .conftest import REPO, compose_dict

CONFIGS = resources.files("coap_dist.configs")


def options(group: str) -> list[str]:
    """The option names of a config group, from the packaged YAML files."""
    return sorted(p.name[: -len(".yaml")] for p in CONFIGS.joinpath(group).iterdir())


MEMMAP = ["data.train_path=/x/train.bin", "data.val_path=/x/val.bin", "data.vocab_size=256"]


def meant_to_work(opt: dict, strategy: dict) -> bool:
    """GaLore/APOLLO have no sharded form; every COAP recipe runs under every strategy."""
    if opt["kind"] in ("galore", "apollo"):
        return strategy["name"] in ("single", "ddp")
    return True


def test_groups_hold_the_documented_options() -> None:
    assert options("model") == ["130m", "1b", "350m", "60m", "7b", "tiny"]
    assert options("optimizer") == [
        "adamw",
        "apollo",
        "coap",
        "coap_8bit",
        "coap_adafactor",
        "galore",
    ]
    assert options("strategy") == [
        "ddp",
        "ddp_owner",
        "deepspeed_zero0",
        "deepspeed_zero1",
        "deepspeed_zero2",
        "deepspeed_zero3",
        "fsdp2",
        "hsdp",
        "single",
    ]
    assert options("data") == ["memmap", "shakespeare"]
    assert options("logger") == ["jsonl", "none", "wandb"]


def test_default_config_compares_coap_with_adamw() -> None:
    cfg = TrainConfig.from_dict(compose_dict())
    assert [o.name for o in cfg.runs] == ["coap", "adamw"]
    assert (cfg.model.name, cfg.strategy.name, cfg.data.name, cfg.logger.name) == (
        "tiny",
        "single",
        "shakespeare",
        "jsonl",
    )
    assert not TrainConfig.from_dict(compose_dict(["compare=false"])).runs[1:]


@pytest.mark.parametrize("name", sorted(LLAMA_PRESETS))
def test_model_configs_have_the_published_dimensions(name: str) -> None:
    cfg = TrainConfig.from_dict(compose_dict([f"model={name}", "seq_len=128"]))
    assert cfg.model.to_llama() == LLAMA_PRESETS[name]


def test_every_optimizer_strategy_pair_composes() -> None:
    """Hydra composes all 6 x 9 pairs; the ones meant to work validate, the others fail
    naming the fields that clash."""
    with initialize_config_module(config_module="coap_dist.configs", version_base="1.3"):
        for opt, strategy in itertools.product(options("optimizer"), options("strategy")):
            overrides = [f"optimizer={opt}", f"strategy={strategy}"]
            data = OmegaConf.to_container(compose(config_name="train", overrides=overrides))
            if meant_to_work(data["optimizer"], data["strategy"]):
                parsed = TrainConfig.from_dict(data)
                assert parsed.optimizer.name == opt
                assert parsed.strategy.name == data["strategy"]["name"]
            else:
                with pytest.raises(ConfigError, match=r"optimizer\.kind=.*strategy"):
                    TrainConfig.from_dict(data)


def test_full_product_of_groups_validates() -> None:
    """All model x optimizer x baseline x strategy x data x logger combinations meant to work:
    sections are composed once per option and recombined (Hydra composes each pair above)."""
    sections = {
        group: {
            name: compose_dict([f"{group}={name}", *(MEMMAP if name == "memmap" else [])])[group]
            for name in options(group)
        }
        for group in ("model", "optimizer", "strategy", "data", "logger")
    }
    base = compose_dict(["seq_len=128"])
    checked = 0
    for model, opt, strategy, data, logger in itertools.product(
        *map(dict.values, sections.values())
    ):
        if not meant_to_work(opt, strategy):
            continue
        config = {
            **base,
            "model": model,
            "optimizer": opt,
            "strategy": strategy,
            "data": data,
            "logger": logger,
        }
        TrainConfig.from_dict(config)
        checked += 1
    pairs = 9 * 4 + 2 * 2  # adamw, coap, coap_adafactor, coap_8bit; galore, apollo
    assert checked == 6 * pairs * 2 * 3


def test_baseline_is_its_own_choice() -> None:
    cfg = TrainConfig.from_dict(compose_dict(["optimizer=coap_8bit", "optimizer@baseline=galore"]))
    assert [(o.name, o.where) for o in cfg.runs] == [
        ("coap_8bit", "optimizer"),
        ("galore", "baseline"),
    ]
    assert cfg.optimizer.hparams.state_bits == 8
    same = TrainConfig.from_dict(compose_dict(["optimizer=adamw"]))
    assert [o.name for o in same.runs] == ["adamw"]


BAD = [
    (
        ["optimizer.rank=-3", "optimizer.rank_ratio=null"],
        "optimizer.rank=-3 is invalid: must be an integer >= 1",
    ),
    (
        ["optimizer.rank=8", "optimizer.rank_ratio=4"],
        "optimizer.rank=8 and optimizer.rank_ratio=4 are both set",
    ),
    (["optimizer.rank_ratio=0"], "optimizer.rank_ratio=0 is invalid: must be a finite number"),
    (["optimizer.lr=-1"], "optimizer.lr=-1 is invalid: must be a finite number in [0.0, inf)"),
    (["optimizer.betas=[0.9]"], "optimizer.betas=(0.9,) is invalid: must be a pair of numbers"),
    (["optimizer.betas=[0.9,1.5]"], "optimizer.betas=(0.9, 1.5) is invalid"),
    (["optimizer.state_bits=4"], "optimizer.state_bits=4 is invalid: must be one of (None, 32"),
    (["optimizer.moments=spin"], "optimizer.moments='spin' is invalid: must be one of"),
    (["+optimizer.momentum=0.9"], "unknown config key optimizer.momentum; did you mean `moments`"),
    (["+optimizer.stager=true"], "unknown config key optimizer.stager; did you mean `stagger`"),
    (["optimizer=coap_adafactor", "+optimizer.beta1=0.9"], "optimizer.beta1 is now `betas`"),
    (["+baseline.rank=4"], "unknown config key baseline.rank"),
    (["+checkpoint.evry=2"], "unknown config key checkpoint.evry; did you mean checkpoint.every?"),
    (["baseline.lr=-1"], "baseline.lr=-1 is invalid"),
    (["steps=0"], "steps must be a positive int, got 0"),
    (["steps=ten"], "steps must be a positive int, got 'ten'"),
    (["batch_size=true"], "batch_size must be a positive int, got True"),
    (["seq_len=512"], "seq_len (512) must be <= model.max_seq_len (256)"),
    (["warmup_steps=500"], "warmup_steps (500) must be < steps"),
    (["eval.every=-1"], "eval.every must be an int >= 0, got -1"),
    (["checkpoint.every=-5"], "checkpoint.every must be an int >= 0, got -5"),
    (["model.dim=130"], "model.dim (130) must be divisible by n_heads (4)"),
    (["model.dim=100"], "model.dim / n_heads (the head size, 100 / 4 = 25) must be even"),
    (["model.n_layers=0"], "model.n_layers must be a positive integer, got 0"),
    (
        ["model=60m", "data=memmap", *MEMMAP[:2], "data.vocab_size=50000"],
        "data vocabulary (50000) exceeds model.vocab_size (32000)",
    ),
    (["strategy=ddp", "+strategy.zero_stage=2"], "unknown config key strategy.zero_stage"),
    (
        ["strategy=deepspeed_zero2", "strategy.zero_stage=4"],
        "strategy.zero_stage must be one of [0, 1, 2, 3], got 4",
    ),
    (
        ["strategy=hsdp", "strategy.replicate_degree=0"],
        "strategy.replicate_degree must be a positive int, got 0",
    ),
    (
        ["strategy=fsdp2", "optimizer=galore"],
        "optimizer.kind=galore supports strategy single or ddp only, got strategy.name=fsdp2",
    ),
    (
        ["strategy=fsdp2", "optimizer.rank=auto", "optimizer.rank_ratio=4", "checkpoint.every=5"],
        "optimizer.rank=auto with strategy.name=fsdp2 and checkpoint.every=5: this strategy",
    ),
    (
        ["strategy=deepspeed_zero2", "optimizer.in_backward=true"],
        "optimizer.in_backward=true is not supported under strategy deepspeed",
    ),
    (
        ["optimizer.in_backward=true", "grad_accum=2"],
        "optimizer.in_backward=true with grad_accum=2: stepping inside the backward",
    ),
    (
        ["strategy=ddp_owner", "optimizer=adamw", "optimizer.in_backward=true"],
        "optimizer.in_backward=true with kind=adamw under strategy ddp_owner",
    ),
    (["optimizer.in_backward=sometimes"], "optimizer.in_backward must be true or false"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode must be one of"),
    (["data.val_docs=[]"], "data.val_docs must be a non-empty list"),
    (["resume=/some/checkpoint"], "resume continues one optimizer's run; set compare=false"),
    (["threads=many"], "threads must be a positive int, auto or null, got 'many'"),
    (["threads=0"], "threads must be a positive int, got 0"),
    (["device=tpu"], "device must be one of ['auto', 'cpu', 'cuda'], got 'tpu'"),
    (["precision=fp8"], "precision must be one of"),
    (["+learning_rate=1"], "unknown config key config.learning_rate"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.from_dict(compose_dict(overrides))


def test_configs_are_frozen_dataclasses() -> None:
    cfg = TrainConfig.from_dict(compose_dict())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3  # type: ignore[misc]
    assert cfg.optimizer.hparams.betas == (0.9, 0.999)


def test_cli_reports_a_bad_value_and_exits_2(tmp_path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coap_dist.train",
            "optimizer.rank=-3",
            "optimizer.rank_ratio=null",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "optimizer.rank=-3 is invalid: must be an integer >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_memmap_paths_are_mandatory() -> None:
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue, match=r"data\.train_path"):
        compose_dict(["data=memmap"])


def test_an_explicit_rank_replaces_the_default_ratio() -> None:
    """optimizer.rank=8 alone is the rank (the app's default rank_ratio steps aside); both
    set is refused naming both; neither, or rank=auto alone, gets rank_ratio 4."""
    from coap_dist.train.config import DEFAULT_RANK_RATIO

    def hp(overrides: list[str]) -> tuple[object, object]:
        h = TrainConfig.from_dict(compose_dict(overrides)).optimizer.hparams
        return h.rank, h.rank_ratio  # type: ignore[attr-defined]

    assert hp([]) == (None, DEFAULT_RANK_RATIO) == (None, 4)
    assert hp(["optimizer.rank=8"]) == (8, None)
    assert hp(["optimizer=coap_adafactor", "optimizer.rank=8"]) == (8, None)
    assert hp(["optimizer.rank_ratio=2"]) == (None, 2)
    assert hp(["optimizer.rank=auto"]) == ("auto", 4)
    with pytest.raises(
        ConfigError, match=r"optimizer\.rank=8 and optimizer\.rank_ratio=2 are both"
    ):
        hp(["optimizer.rank=8", "optimizer.rank_ratio=2"])


def test_overrides_of_keys_the_config_lacks_are_named_before_hydra_starts() -> None:
    """A misspelt key or config-group option names the nearest one (for a key: of the
    recipe's and its kind's hyperparameters);
    a hyperparameter the recipe does not list is added with ``+``; a key another kind has
    is only named; valid command lines (``+``, ``++``, ``~``) pass."""
    from coap_dist.train.__main__ import _launch_problem

    assert "did you mean optimizer.rank?" in str(_launch_problem(["optimizer.rnak=2"]))
    assert "did you mean optimizer.rank?" in str(
        _launch_problem(["optimizer.rnak=2", "+optimizer.rnak=3"])
    )
    assert str(_launch_problem(["optimizer.skip_nonfinite=false"])).endswith(
        "set it with +optimizer.skip_nonfinite=false"
    )
    other = str(_launch_problem(["optimizer=adamw", "optimizer.rank=4"]))
    assert other.startswith("the config has no key optimizer.rank") and "+" not in other
    assert "did you mean eval.every?" in str(_launch_problem(["eval.evry=3"]))
    assert "no key evl (override 'evl.every=3'); did you mean eval?" in str(
        _launch_problem(["evl.every=3"])
    )
    assert "did you mean hydra.run.dir?" in str(_launch_problem(["hydra.run.dri=/tmp/x"]))
    assert _launch_problem(["optimizer@baseline=adamx"]) == (
        "optimizer@baseline=adamx is not an option of config group optimizer; did you mean "
        "optimizer@baseline=adamw? options: ['adamw', 'apollo', 'coap', 'coap_8bit', "
        "'coap_adafactor', 'galore']"
    )
    assert str(_launch_problem(["model=nope"])).startswith("model=nope is not an option")
    # As the launch scripts call it, and every invalid override at once.
    assert "did you mean optimizer.rank?" in str(
        _launch_problem(["--config-name=train", "optimizer.rnak=2"])
    )
    both = str(_launch_problem(["optimizer=coap8bit", "optimizer.rnak=2", "evl.every=2"]))
    assert "did you mean optimizer=coap_8bit?" in both and "did you mean optimizer.rank?" in both
    assert "did you mean eval?" in both and both.count("; did you mean") == 3, both
    assert str(
        _launch_problem(["strategy=deepspeed_zero2", "strategy.extra.zero_optimization.stage=1"])
    ).endswith("add it with +strategy.extra.zero_optimization.stage=1")
    # A sweep: every job's config is checked before the first starts, naming the job.
    assert str(_launch_problem(["--multirun", "optimizer.rnak=2,4"])).startswith(
        "sweep job optimizer.rnak=2: the config has no key optimizer.rnak"
    )
    assert _launch_problem(["-m", "optimizer.rank=2,-1", "steps=3", "warmup_steps=0"]) == (
        "sweep job optimizer.rank=-1: optimizer.rank=-1 is invalid: must be an integer >= 1 "
        'or "auto", or None (use rank_ratio)'
    )
    assert str(_launch_problem(["-m", "optimizer=coap,adamww"])).startswith(
        "sweep job optimizer=adamww: optimizer=adamww is not an option of config group"
    )
    # past SWEEP_PRODUCT_CHECKED jobs, each value once (the others at their first)
    many = _launch_problem(["-m", "seed=range(0,70)", "optimizer.rank=choice(2,-1)"])
    assert str(many).startswith("sweep job seed=0 optimizer.rank=-1: optimizer.rank=-1 is")
    assert str(_launch_problem(["-m", "seed=1,2", "hydra.sweep.dir=/proc/x"])).startswith(
        "hydra.sweep.dir='/proc/x' cannot be created"
    )
    assert _launch_problem(["-m", "seed=1,2", "optimizer.rank=2,4", "compare=false"]) is None
    assert _launch_problem(["-m", "lr=interval(0,1)"]) is None  # a sweeper plugin's syntax
    for fine in (
        ["+optimizer.skip_nonfinite=false"],
        ["++optimizer.rank=4"],
        ["~optimizer.stagger"],
        ["optimizer.rank=4", "steps=3"],
    ):
        assert _launch_problem(fine) is None, fine
