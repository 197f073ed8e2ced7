"""Validated, typed view of the training app's Hydra config; side-effect free.

Hydra composes a plain tree from ``coap_dist/configs``; :meth:`TrainConfig.from_dict` turns it
into frozen kw-only dataclasses whose ``__post_init__`` checks every value, so a bad value fails
before any process group, model or file exists, with a message that names the field as it is
spelled on the command line, e.g. ``optimizer.rank must be a positive int, got -3``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from coap_dist.models.llama import LlamaConfig
from coap_dist.optim.config import (
    COAPAdafactorConfig,
    COAPAdamWConfig,
    Hyperparameters,
    choice,
    hp,
    integer,
    nearest_key,
    number,
    unit_pair,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


LATEST = "latest"
"""``resume=latest``: the newest complete checkpoint of the run in its own run dir, or a
fresh start where there is none yet (a requeued or restarted job continues by itself)."""


class RunError(RuntimeError):
    """The run stopped for a reason outside its config (a full disk, a failing write): the
    message says what happened and what to do; ``coap-train`` prints it and exits 1 without
    a traceback (earlier checkpoints are intact)."""


class ConfigError(ValueError):
    """An invalid config value; the message names the field (``optimizer.rank``)."""


# ----------------------------------------------------------------------------- value checks


def _int(field: str, value: object, *, low: int = 1) -> int:
    """``value`` as an int >= ``low`` (bools are rejected: ``True`` is no step count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive int" if low == 1 else f"an int >= {low}"
        raise ConfigError(f"{field} must be {what}, got {value!r}")
    return value


def _float(
    field: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """``value`` as a float in the interval given by ``low``/``high`` (ints are accepted)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{field} must be a number, got {value!r}")
    x = float(value)
    below = low is not None and (x <= low if open_low else x < low)
    above = high is not None and (x >= high if open_high else x > high)
    if below or above or x != x:
        lo = "(" if open_low else "["
        hi = ")" if open_high else "]"
        interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ConfigError(f"{field} must be in {interval}, got {value!r}")
    return x


def _bool(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field} must be true or false, got {value!r}")
    return value


def _str(field: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{field} must be a non-empty string, got {value!r}")
    return value


def _choice(field: str, value: object, choices: tuple[Any, ...]) -> Any:
    if value not in choices:
        raise ConfigError(f"{field} must be one of {list(choices)}, got {value!r}")
    return value


def _set(obj: object, name: str, value: object) -> None:
    """Normalize a field of a frozen dataclass inside ``__post_init__``."""
    object.__setattr__(obj, name, value)


_D = TypeVar("_D", bound="DataclassInstance")


def _from_mapping(
    cls: type[_D], section: str, data: object, allowed: set[str] | None = None, **extra: Any
) -> _D:
    """Build dataclass ``cls`` from ``data``, rejecting unknown or missing keys by name."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{section} must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls) if f.init} - set(extra)
    allowed = names if allowed is None else allowed
    unknown = sorted(set(data) - allowed)
    if unknown:
        keys = ", ".join(f"{section}.{k}" for k in unknown)
        near = [f"{section}.{n}" for k in unknown if (n := nearest_key(k, allowed))]
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise ConfigError(f"unknown config key {keys}; {hint}{section} accepts {sorted(allowed)}")
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in extra
    }
    missing = sorted(required - set(data))
    if missing:
        raise ConfigError(f"missing config key {', '.join(f'{section}.{k}' for k in missing)}")
    return cls(**dict(data), **extra)


# ----------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A LLaMA shape (``configs/model/*.yaml``); ``name`` labels it in logs."""

    name: str
    vocab_size: int
    dim: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    max_seq_len: int
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _str("model.name", self.name)
        _set(self, "norm_eps", _float("model.norm_eps", self.norm_eps, low=0.0, open_low=True))
        try:
            self.to_llama()
        except ValueError as err:
            raise ConfigError(str(err).replace("LlamaConfig.", "model.")) from None

    def to_llama(self) -> LlamaConfig:
        """The :class:`LlamaConfig` the model is built from."""
        fields = dataclasses.asdict(self)
        fields.pop("name")
        return LlamaConfig(**fields)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamWRecipe(Hyperparameters):
    """``torch.optim.AdamW``'s keys the app sets (the full-rank baseline)."""

    optimizer_name: ClassVar[str] = "AdamW"

    lr: float = hp(1e-3, "learning rate", number(low=0.0))
    betas: tuple[float, float] = hp((0.9, 0.999), "Adam's (beta1, beta2)", unit_pair)
    eps: float = hp(1e-6, "added to sqrt(V)", number(low=0.0))
    weight_decay: float = hp(0.0, "decoupled weight decay", number(low=0.0))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GaLoreRecipe(AdamWRecipe):
    """``galore_torch.GaLoreAdamW``'s keys (its low-rank groups get the projection keys)."""

    optimizer_name: ClassVar[str] = "GaLoreAdamW"

    rank: int = hp(32, "projection rank", integer(low=1))
    update_proj_gap: int = hp(200, "steps between SVDs", integer(low=1))
    scale: float = hp(0.25, "update scale", number(low=0.0, strict=True))
    proj_type: str = hp(
        "std", "projection side rule", choice(("std", "reverse_std", "left", "right", "full"))
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApolloRecipe(GaLoreRecipe):
    """``apollo_torch.APOLLOAdamW``'s keys."""

    optimizer_name: ClassVar[str] = "APOLLOAdamW"

    scale: float = hp(1.0, "update scale", number(low=0.0, strict=True))
    proj: str = hp("random", "projection kind", choice(("random", "svd")))
    scale_type: str = hp("channel", "scaling granularity", choice(("channel", "tensor")))


DEFAULT_RANK_RATIO = 4
"""The app's COAP rank when a recipe sets neither ``rank`` nor ``rank_ratio`` (or
``rank="auto"`` alone, whose budget it is): r = min(m, n) // 4. Applied here rather than in
the YAML so that ``optimizer.rank=8`` alone replaces it; setting both is refused."""

RECIPES: dict[str, type[Hyperparameters]] = {
    "coap": COAPAdamWConfig,
    "coap_adafactor": COAPAdafactorConfig,
    "adamw": AdamWRecipe,
    "galore": GaLoreRecipe,
    "apollo": ApolloRecipe,
}
"""Optimizer kind -> the dataclass holding its keys, defaults and checks. COAP's are the
library's own (:mod:`coap_dist.optim.config`): every constructor key is a config key."""

OPTIMIZER_KINDS = tuple(RECIPES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """One optimizer recipe (``configs/optimizer/*.yaml``): ``name``, ``kind`` and the
    kind's hyperparameters (every other key of the section), in ``hparams``.

    ``kind`` picks the implementation and its hyperparameter dataclass (:data:`RECIPES`):
    ``coap`` -> ``coap_dist.COAPAdamW`` (:class:`~coap_dist.COAPAdamWConfig`),
    ``coap_adafactor`` -> ``coap_dist.COAPAdafactor``, ``adamw`` -> ``torch.optim.AdamW``,
    ``galore`` -> ``galore_torch.GaLoreAdamW``, ``apollo`` -> ``apollo_torch.APOLLOAdamW``.
    ``lr`` is required. ``name`` labels the run in the table, logs and checkpoints; ``where``
    is the config key the section came from (``optimizer`` or ``baseline``). ``in_backward``
    (any kind) steps the optimizer inside the backward pass
    (:func:`coap_dist.optimizer_in_backward`, exact clipping by a norm pre-pass).
    """

    name: str
    kind: str
    hparams: Hyperparameters
    where: str = dataclasses.field(default="optimizer", repr=False, compare=False)
    in_backward: bool = False

    @classmethod
    def from_dict(cls, where: str, data: object) -> OptimizerConfig:
        """Build from the ``where`` section; its keys are validated by the kind's dataclass
        (the optimizer's own checks, so the app and the library cannot disagree)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {data!r}")
        kind = _choice(f"{where}.kind", data.get("kind"), OPTIMIZER_KINDS)
        for key in ("name", "lr"):
            if key not in data:
                raise ConfigError(f"missing config key {where}.{key}")
        rest = {k: v for k, v in data.items() if k not in ("name", "kind", "in_backward")}
        recipe = RECIPES[kind]
        if (
            issubclass(recipe, COAPAdamWConfig)
            and rest.get("rank") in (None, "auto")
            and rest.get("rank_ratio") is None
        ):
            rest["rank_ratio"] = DEFAULT_RANK_RATIO  # a rank the user sets replaces it
        try:
            hparams = recipe.from_mapping(rest, f"{where}.")
            if isinstance(hparams, COAPAdamWConfig):
                hparams.validate_group(hparams.as_dict("group"), f"{where}.")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return cls(
            name=_str(f"{where}.name", data["name"]),
            kind=kind,
            hparams=hparams,
            where=where,
            in_backward=_bool(f"{where}.in_backward", data.get("in_backward", False)),
        )

    def kwargs(self) -> dict[str, Any]:
        """The constructor arguments of this kind (every hyperparameter)."""
        return self.hparams.as_dict()

    def settings(self) -> dict[str, Any]:
        """``name``, ``kind`` and every hyperparameter, flat (what a checkpoint records)."""
        return {"name": self.name, "kind": self.kind, **self.kwargs()}


STRATEGIES = ("single", "ddp", "ddp_owner", "fsdp2", "hsdp", "deepspeed")
_STRATEGY_KEYS: dict[str, set[str]] = {
    "single": set(),
    "ddp": set(),
    "ddp_owner": set(),
    "fsdp2": {"reshard_after_forward"},
    "hsdp": {"reshard_after_forward", "replicate_degree"},
    "deepspeed": {"zero_stage", "extra"},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """How the model and optimizer are spread over processes (``configs/strategy``).

    ``single``: one process. ``ddp``: replicated model and optimizer. ``ddp_owner``: DDP with
    optimizer state sharded by owner rank (COAP ``sharding="owner"``, ZeRO-1 for AdamW).
    ``fsdp2``/``hsdp``: ``fully_shard`` per block (``hsdp`` on a 2-D mesh of
    ``replicate_degree`` replicas). ``deepspeed``: a DeepSpeed engine at ``zero_stage``, with
    ``extra`` merged into its JSON config.
    """

    name: str
    reshard_after_forward: bool = True
    replicate_degree: int = 1
    zero_stage: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: object) -> StrategyConfig:
        """Build from the ``strategy`` section, accepting only the keys of its ``name``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"strategy must be a mapping, got {data!r}")
        name = _choice("strategy.name", data.get("name"), STRATEGIES)
        return _from_mapping(cls, "strategy", data, {"name"} | _STRATEGY_KEYS[name])

    def __post_init__(self) -> None:
        _choice("strategy.name", self.name, STRATEGIES)
        _bool("strategy.reshard_after_forward", self.reshard_after_forward)
        _int("strategy.replicate_degree", self.replicate_degree)
        if self.name == "deepspeed":
            _choice("strategy.zero_stage", self.zero_stage, (0, 1, 2, 3))
        elif self.zero_stage is not None:
            raise ConfigError(f"strategy.zero_stage applies to deepspeed only, not {self.name}")
        if not isinstance(self.extra, Mapping):
            raise ConfigError(f"strategy.extra must be a mapping, got {self.extra!r}")

    @property
    def distributed(self) -> bool:
        """Whether this strategy needs a process group."""
        return self.name != "single"


DATA_KINDS = ("shakespeare", "memmap")
_DATA_KEYS = {
    "shakespeare": {"val_docs"},
    "memmap": {"train_path", "val_path", "dtype", "vocab_size"},
}
MEMMAP_DTYPES = {"uint8": 2**8, "uint16": 2**16, "uint32": 2**32, "int32": 2**31, "int64": 2**63}
"""Element types of a memmap token file -> the number of ids each can hold."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Token source (``configs/data``).

    ``shakespeare``: the packaged corpus as byte tokens (vocabulary 256), with the works named
    in ``val_docs`` held out for validation. ``memmap``: the user's pre-tokenized flat arrays
    of token ids (``train_path``, ``val_path``, element type ``dtype``, ids < ``vocab_size``).
    """

    name: str
    val_docs: tuple[str, ...] = ("macbeth_gut.txt", "twelfth_night_gut.txt")
    train_path: str | None = None
    val_path: str | None = None
    dtype: str = "uint16"
    vocab_size: int = 256

    @classmethod
    def from_dict(cls, data: object) -> DataConfig:
        """Build from the ``data`` section, accepting only the keys of its ``name``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"data must be a mapping, got {data!r}")
        name = _choice("data.name", data.get("name"), DATA_KINDS)
        return _from_mapping(cls, "data", data, {"name"} | _DATA_KEYS[name])

    def __post_init__(self) -> None:
        _choice("data.name", self.name, DATA_KINDS)
        if not isinstance(self.val_docs, list | tuple) or not self.val_docs:
            raise ConfigError(f"data.val_docs must be a non-empty list, got {self.val_docs!r}")
        _set(self, "val_docs", tuple(_str("data.val_docs[]", d) for d in self.val_docs))
        if self.name == "memmap":
            for key in ("train_path", "val_path"):
                path = _str(f"data.{key}", getattr(self, key))
                if path == "???":
                    raise ConfigError(f"data.{key} must be set to the path of a token file")
        _choice("data.dtype", self.dtype, tuple(MEMMAP_DTYPES))
        _int("data.vocab_size", self.vocab_size)
        if self.name == "memmap" and self.vocab_size > MEMMAP_DTYPES[self.dtype]:
            raise ConfigError(
                f"data.vocab_size={self.vocab_size} does not fit data.dtype={self.dtype} (ids < "
                f"{MEMMAP_DTYPES[self.dtype]}): set data.dtype to the dtype the token file was "
                "written with (reading wider ids narrower would train on their bytes)"
            )


LOGGERS = ("none", "jsonl", "wandb")
_LOGGER_KEYS = {
    "none": set(),
    "jsonl": {"filename"},
    "wandb": {"project", "entity", "mode", "group", "tags", "filename"},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggerConfig:
    """Where per-step metrics go (``configs/logger``): nowhere, a JSON-lines file, or wandb.

    ``wandb`` also writes the JSON-lines file ``filename`` so a run always leaves its numbers
    on disk; ``mode`` is wandb's (``online``, ``offline``, ``disabled``).
    """

    name: str
    filename: str = "metrics.jsonl"
    project: str = "coap_dist"
    entity: str | None = None
    mode: str = "online"
    group: str | None = None
    tags: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: object) -> LoggerConfig:
        """Build from the ``logger`` section, accepting only the keys of its ``name``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"logger must be a mapping, got {data!r}")
        name = _choice("logger.name", data.get("name"), LOGGERS)
        return _from_mapping(cls, "logger", data, {"name"} | _LOGGER_KEYS[name])

    def __post_init__(self) -> None:
        _choice("logger.name", self.name, LOGGERS)
        _str("logger.filename", self.filename)
        _str("logger.project", self.project)
        _choice("logger.mode", self.mode, ("online", "offline", "disabled"))
        if not isinstance(self.tags, list | tuple):
            raise ConfigError(f"logger.tags must be a list, got {self.tags!r}")
        _set(self, "tags", tuple(_str("logger.tags[]", t) for t in self.tags))


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Validation: every ``every`` steps (0: only at the end) on ``batches`` fixed batches."""

    every: int = 0
    batches: int = 8

    def __post_init__(self) -> None:
        _int("eval.every", self.every, low=0)
        _int("eval.batches", self.batches)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Save every ``every`` steps (0: never) under ``dir`` (relative to the run dir)."""

    every: int = 0
    dir: str = "checkpoints"

    def __post_init__(self) -> None:
        _int("checkpoint.every", self.every, low=0)
        _str("checkpoint.dir", self.dir)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The whole run (``configs/train.yaml``); see that file for what each key does."""

    model: ModelConfig
    optimizer: OptimizerConfig
    baseline: OptimizerConfig | None = None
    strategy: StrategyConfig
    data: DataConfig
    logger: LoggerConfig
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    seed: int = 0
    compare: bool = True
    steps: int = 100
    batch_size: int = 16
    seq_len: int = 128
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    activation_checkpointing: bool = False
    compile: bool = False
    log_every: int = 10
    resume: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    threads: int | str | None = "auto"
    progress: bool = True
    plot: bool = True
    overwrite: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Validate a resolved Hydra config (``OmegaConf.to_container(cfg, resolve=True)``)."""
        data = {k: v for k, v in data.items() if k != "hydra"}
        sections: dict[str, Any] = {
            "model": lambda d: _from_mapping(ModelConfig, "model", d),
            "optimizer": lambda d: OptimizerConfig.from_dict("optimizer", d),
            "baseline": lambda d: None if d is None else OptimizerConfig.from_dict("baseline", d),
            "strategy": StrategyConfig.from_dict,
            "data": DataConfig.from_dict,
            "logger": LoggerConfig.from_dict,
            "eval": lambda d: _from_mapping(EvalConfig, "eval", d),
            "checkpoint": lambda d: _from_mapping(CheckpointConfig, "checkpoint", d),
        }
        built: dict[str, Any] = dict(data)
        for key, build in sections.items():
            if key in data:
                built[key] = build(data[key])
        return _from_mapping(cls, "config", built)

    def __post_init__(self) -> None:
        _int("seed", self.seed, low=0)
        _bool("compare", self.compare)
        _int("steps", self.steps)
        _int("batch_size", self.batch_size)
        _int("seq_len", self.seq_len)
        _int("warmup_steps", self.warmup_steps, low=0)
        _choice("lr_schedule", self.lr_schedule, ("cosine", "linear", "constant"))
        _set(self, "min_lr_ratio", _float("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0))
        _set(self, "max_grad_norm", _float("max_grad_norm", self.max_grad_norm, low=0.0))
        _int("grad_accum", self.grad_accum)
        _bool("activation_checkpointing", self.activation_checkpointing)
        _bool("compile", self.compile)
        _int("log_every", self.log_every)
        if self.resume is not None:
            _str("resume", self.resume)
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("precision", self.precision, ("fp32", "bf16"))
        if isinstance(self.threads, str) and self.threads != "auto":
            raise ConfigError(f"threads must be a positive int, auto or null, got {self.threads!r}")
        if self.threads is not None and self.threads != "auto":
            _int("threads", self.threads)
        _bool("progress", self.progress)
        _bool("plot", self.plot)
        _bool("overwrite", self.overwrite)
        self._check_combination()

    def _check_combination(self) -> None:
        """Cross-field rules: each message names the fields that disagree."""
        if self.resume == LATEST and not self.checkpoint.every:
            raise ConfigError(
                "resume=latest continues from this run dir's newest checkpoint, but "
                "checkpoint.every=0 writes none: set checkpoint.every (e.g. 100)"
            )
        if self.overwrite and self.resume is not None:
            raise ConfigError(
                "overwrite=true starts this job's runs over in their run dir, resume= continues "
                "one: set one of them"
            )
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"seq_len ({self.seq_len}) must be <= model.max_seq_len ({self.model.max_seq_len})"
            )
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be divisible by grad_accum "
                f"({self.grad_accum}): each optimizer step averages grad_accum equal micro-batches"
            )
        if self.compile and self.strategy.name == "deepspeed":
            raise ConfigError(
                "compile=true is not supported under strategy deepspeed (DeepSpeed's module "
                "hooks and per-block torch.compile are not tested together); set compile=false"
            )
        if self.warmup_steps >= self.steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        data_vocab = 256 if self.data.name == "shakespeare" else self.data.vocab_size
        if data_vocab > self.model.vocab_size:
            raise ConfigError(
                f"data vocabulary ({data_vocab}) exceeds model.vocab_size ({self.model.vocab_size})"
            )
        for opt in self.runs:
            if opt.kind in ("galore", "apollo") and self.strategy.name not in ("single", "ddp"):
                raise ConfigError(
                    f"{opt.where}.kind={opt.kind} supports strategy single or ddp only, "
                    f"got strategy.name={self.strategy.name}"
                )
        for opt in (o for o in self.runs if o.in_backward):
            if self.strategy.name == "deepspeed":
                raise ConfigError(
                    f"{opt.where}.in_backward=true is not supported under strategy deepspeed "
                    "(engine.backward/engine.step own the gradient partitions and step after "
                    "the whole backward); use strategy=fsdp2, hsdp, ddp_owner or ddp, or "
                    "set in_backward=false"
                )
            if self.grad_accum > 1:
                raise ConfigError(
                    f"{opt.where}.in_backward=true with grad_accum={self.grad_accum}: stepping "
                    "inside the backward frees each gradient at once, so micro-batches cannot "
                    "accumulate; set grad_accum=1 (a larger batch_size) or in_backward=false"
                )
            if opt.kind == "adamw" and self.strategy.name == "ddp_owner":
                raise ConfigError(
                    f"{opt.where}.in_backward=true with kind=adamw under strategy ddp_owner: "
                    "its ZeroRedundancyOptimizer broadcasts every parameter after each step, "
                    "once per gradient bucket inside the backward; use strategy=ddp or "
                    "strategy=fsdp2 for the AdamW baseline, or in_backward=false"
                )
        for opt in self.runs:
            auto = getattr(opt.hparams, "rank", None) == "auto"
            if auto and self.checkpoint.every and self.strategy.name in ("fsdp2", "hsdp"):
                raise ConfigError(
                    f"{opt.where}.rank=auto with strategy.name={self.strategy.name} and "
                    f"checkpoint.every={self.checkpoint.every}: this strategy checkpoints "
                    "through torch.distributed.checkpoint, which cannot carry ranks chosen "
                    "during training. Set a fixed rank (or rank_ratio), checkpoint.every=0, or "
                    "strategy=ddp_owner"
                )
        if self.resume is not None and len(self.runs) > 1:
            raise ConfigError(
                "resume continues one optimizer's run; set compare=false (the checkpoint "
                f"belongs to one of {[o.name for o in self.runs]})"
            )

    @property
    def runs(self) -> list[OptimizerConfig]:
        """The optimizers trained one after the other: ``optimizer``, then ``baseline`` when
        ``compare`` is set and it is a different recipe."""
        runs = [self.optimizer]
        if self.compare and self.baseline is not None and self.baseline.name != self.optimizer.name:
            runs.append(self.baseline)
        return runs


# ----------------------------------------------------------------------------- resume rules

RESUME_REFUSED: tuple[str, ...] = (
    "model.",
    "optimizer.name",
    "optimizer.kind",
    *(f"optimizer.{key}" for key in COAPAdamWConfig.planned_keys()),
    "optimizer.proj_type",
    "optimizer.proj",
)
"""Settings a resumed run must keep (field-path prefixes): the model's shape and what the
optimizer state's shapes and formats depend on (COAP's hyperparameters that its state is
planned from, ``COAPAdamWConfig.planned_keys()``: rank, rank_ratio, state_bits, algorithm,
projection_side, rank_ratio_cnn, refresh, stagger; the optimizer itself; GaLore/APOLLO
projection types). Everything else takes effect on resume: the
optimizer's other hyperparameters (lr, betas, eps, weight_decay, update_interval,
reproject_factor, scale, projector_update, moments, ...) replace the saved ones, and
schedule, batch, data, precision, accumulation, logging, evaluation and checkpoint settings
apply from the next step."""

RESUME_REFUSED_DEEPSPEED: tuple[str, ...] = ("precision", "strategy.zero_stage")
"""Also kept under DeepSpeed, whose engine checkpoints depend on them (with the world size)."""


def resume_settings(cfg: TrainConfig, opt_cfg: OptimizerConfig) -> dict[str, Any]:
    """The run's settings as ``{"field.path": value}`` (``optimizer.*`` from ``opt_cfg``, the
    optimizer this run trains), stored in each checkpoint and compared on resume."""
    out: dict[str, Any] = {}

    def add(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                if f.compare:
                    add(f"{prefix}{f.name}.", getattr(value, f.name))
        elif isinstance(value, Mapping):
            for k, v in value.items():
                add(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = list(value) if isinstance(value, tuple) else value

    for f in dataclasses.fields(cfg):
        job_only = ("resume", "compare", "progress", "plot", "threads", "overwrite")
        if f.name in ("optimizer", "baseline", *job_only):
            continue  # which runs, and how they look: not part of a run's settings
        add(f"{f.name}.", getattr(cfg, f.name))
    add("optimizer.", opt_cfg.settings())
    return out


def override_value(value: Any) -> str:
    """``value`` as a Hydra command line writes it (``null``, ``true``, ``[0.9,0.99]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return f"[{','.join(override_value(v) for v in value)}]"
    return str(value)


def resume_changes(
    saved: Mapping[str, Any], new: Mapping[str, Any], *, deepspeed: bool, where: str
) -> list[tuple[str, Any, Any]]:
    """The settings that differ between a checkpoint (``saved``) and this run (``new``), as
    ``(field, saved value, new value)``; raises :class:`ConfigError` naming the first one a
    resume cannot honour (:data:`RESUME_REFUSED`, and :data:`RESUME_REFUSED_DEEPSPEED` under
    DeepSpeed), with what to set."""
    refused = RESUME_REFUSED + (RESUME_REFUSED_DEEPSPEED if deepspeed else ())
    changes = []
    for key in sorted(set(saved) | set(new)):
        old, cur = saved.get(key, "<unset>"), new.get(key, "<unset>")
        if old == cur:
            continue
        if any(key == r or (r.endswith(".") and key.startswith(r)) for r in refused):
            raise ConfigError(
                f"resume={where!r}: {key} was {old!r} in the checkpoint, this run sets {cur!r}; "
                f"the saved state cannot be carried over to it. Resume with "
                f"{key}={override_value(old)}, or "
                f"start a new run without resume"
            )
        changes.append((key, old, cur))
    return changes
