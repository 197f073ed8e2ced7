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

import itertools
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from coap_dist.train.config import ConfigError, RunError


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
    except (ConfigError, OmegaConfBaseException, RunError) as err:
        config_error = not isinstance(err, RunError)
        what = "invalid config" if config_error else "stopped"
        print(f"coap_dist.train: {what}: {err}", file=sys.stderr, flush=True)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # A sweep's launcher (basic, submitit, ...) reports an exception as the job's
            # failure; SystemExit would end a submitit task without a result to report.
            raise (ConfigError if config_error else RunError)(str(err)) from None
        raise SystemExit(2 if config_error else 1) from None


def cli() -> None:
    """The ``coap-train`` console script and ``python -m coap_dist.train``: :func:`main`,
    after checking what Hydra would report in its own words, or only part-way through a
    sweep, before any of the app's code runs: a run (or sweep) directory that cannot be
    created (a read-only ``hydra.run.dir`` would end in Hydra's traceback), an override of a
    key the config does not have (Hydra's message suggests appending it with ``+``) and,
    for a sweep (``-m``), every job's config (a bad value in its third job would stop the
    sweep after two whole runs). Each is one line naming the key (with the nearest
    existing one for a misspelt key) and the sweep job, and exit code 2."""
    problem = _launch_problem(sys.argv[1:])
    if problem:
        print(f"coap_dist.train: invalid config: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    main()


SWEEP_PRODUCT_CHECKED = 64
"""A sweep of at most this many jobs has every job's config checked before it starts; a
larger one has each swept value checked once (with the other keys at their first value)."""


def _runs(argv: list[str]) -> tuple[str, list[str], list[list[str]], bool] | None:
    """``(config name, overrides every job shares, each job's overrides, is a sweep)`` of a
    command line that starts one run of the package's configs (the launch scripts pass
    ``--config-name=...``; ``--config-dir`` adds a search path, as for the submitit
    launcher) or a basic sweep of them (``-m``/``--multirun`` with ``a,b``, ``choice(...)``
    or ``range(...)`` values); None for anything else (``--help``, ``--cfg``, another
    primary config, a sweeper plugin's own syntax or a sweep over config files: Hydra
    handles those)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    name, extra, overrides, sweep = "train", [], [], False
    args = iter(argv)
    for a in args:
        flag, eq, value = a.partition("=")
        if flag in ("--config-name", "-cn"):
            name = value if eq else next(args, "")
        elif flag in ("--config-dir", "-cd"):
            where = Path(value if eq else next(args, "")).expanduser().absolute()
            extra = [f"hydra.searchpath=[file://{where}]"]
        elif a in ("-m", "--multirun"):
            sweep = True
        elif a.startswith("-"):
            return None
        else:
            overrides.append(a)
    if not name or any(o.partition("=")[0] == "hydra.searchpath" for o in overrides):
        return None
    if not sweep:
        return name, extra, [overrides], False
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        if any(o.get_key_element().startswith("hydra/sweeper") for o in parsed):
            return None
        values = [
            [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            if o.is_sweep_override()
            else [str(o.input_line)]
            for o in parsed
        ]
    except HydraException:  # Hydra reports a syntax error itself
        return None
    if math.prod(len(v) for v in values) <= SWEEP_PRODUCT_CHECKED:
        return name, extra, [list(job) for job in itertools.product(*values)], True
    first = [v[0] for v in values]
    jobs = [first] + [
        [*first[:i], value, *first[i + 1 :]] for i, vs in enumerate(values) for value in vs[1:]
    ]
    return name, extra, jobs, True


def _compose(name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="coap_dist.configs", version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


def _launch_problem(argv: list[str]) -> str | None:
    """Why this command line cannot start: overrides of unknown keys or config-group
    options (every one, each with the nearest existing name), for a sweep a job whose
    config the app refuses, or a ``hydra.run.dir`` (``hydra.sweep.dir``) that cannot be
    created (None: it can start, or it is neither a single run nor a basic sweep; Hydra
    reports the rest)."""
    runs = _runs(argv)
    if runs is None:
        return None
    name, extra, jobs, sweep = runs
    given = set(argv)
    cfg = None
    for job in jobs:
        swept = " ".join(o for o in job if o not in given)
        cfg, problem = _compose_problem(name, extra, job)
        if cfg is None:
            return None
        if problem is None and sweep:
            problem = _job_problem(cfg)
        if problem is not None:
            return (f"sweep job {swept}: " if swept else "") + problem
    assert cfg is not None
    node = cfg.hydra.sweep if sweep else cfg.hydra.run
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    run_dir = Path(str(node.dir)).expanduser().absolute()
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".coap-probe-"))
    except OSError as err:
        return (
            f"{key}={str(run_dir)!r} cannot be created ({err.strerror or err} at "
            f"{parent}); set {key} to a writable directory"
        )
    return None


def _compose_problem(
    name: str, extra: list[str], overrides: list[str]
) -> tuple[DictConfig | None, str | None]:
    """``(config, problem)`` of one run's ``overrides`` (after ``extra``, the search path):
    the composed config and None, or the overrides of unknown keys and config-group
    options (every one, each with the nearest existing name); ``(None, None)`` for an error
    Hydra reports itself."""
    options: list[str] = []
    keys: list[tuple[str, list[str]]] = []  # (missing key, its overrides)
    rest = list(overrides)
    while True:  # drop each invalid override until the rest composes
        try:
            cfg = _compose(name, extra + rest)
            break
        except Exception as err:  # Hydra's own message follows, but for these two
            option = _unknown_option(rest, err)
            missing = None if option else _missing_key(rest, err)
            if option is not None:
                options.append(option[0])
                drop = option[1]
            elif missing is not None:
                keys.append(missing)
                named = {o.partition("=")[0] for o in missing[1]}  # (and its +key= form)
                drop = [o for o in rest if o.partition("=")[0].lstrip("+~") in named]
            else:
                return None, None
            rest = [o for o in rest if o not in drop]
    problems = options + [_unknown_key(key, bad, cfg) for key, bad in keys]
    return cfg, "; ".join(problems) if problems else None


def _job_problem(cfg: DictConfig) -> str | None:
    """The app's refusal of one composed job config (what :func:`main` would raise when
    the job starts), or None."""
    from coap_dist.train.config import TrainConfig

    try:
        job = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"])
        config = OmegaConf.to_container(job, resolve=True, throw_on_missing=True)
        assert isinstance(config, dict)
        TrainConfig.from_dict(cast(dict[str, Any], config))
    except (ConfigError, OmegaConfBaseException) as err:
        return str(err)
    return None


def _unknown_option(overrides: list[str], err: Exception) -> tuple[str, list[str]] | None:
    """For a config-group choice that does not exist (``optimizer=nope``): one line naming
    it and the group's options, with the nearest one, and the overrides that chose it;
    None for any other error."""
    from hydra.errors import MissingConfigException

    from coap_dist.optim.config import nearest_key

    options = getattr(err, "options", None)
    if not isinstance(err, MissingConfigException) or not options:
        return None
    group, _, name = str(err.missing_cfg_file).rpartition("/")
    bad = [
        o
        for o in overrides
        if (kv := o.partition("="))[2] == name and kv[0].lstrip("+~").split("@")[0] == group
    ]
    if not bad:
        return None
    key = bad[0].partition("=")[0].lstrip("+~")  # (optimizer@baseline=...: the baseline's)
    near = nearest_key(name, options)
    hint = f"did you mean {key}={near}? " if near else ""
    return f"{key}={name} is not an option of config group {group}; {hint}options: {options}", bad


def _missing_key(overrides: list[str], err: Exception) -> tuple[str, list[str]] | None:
    """For a composition that failed on an override of a key its section does not have:
    the key and the overrides that name it or a key below it (``evl.every=3`` misses
    ``evl``); None for any other error."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if not isinstance(cause, ConfigAttributeError | ConfigKeyError) or not key:
        return None
    bad = [o for o in overrides if (k := o.partition("=")[0]) == key or k.startswith(f"{key}.")]
    return (str(key), bad) if bad else None


def _unknown_key(key: str, bad: list[str], cfg: DictConfig) -> str:
    """The message for an override of ``key``, which ``cfg`` (composed without the invalid
    overrides) lacks: the nearest key of its section, or, for a hyperparameter of the
    section's optimizer kind that its recipe does not list (``optimizer.skip_nonfinite=
    false``), Hydra's ``+key=value`` form that adds it; under ``strategy.extra`` (DeepSpeed
    JSON, empty by default) the ``+`` form too."""
    from coap_dist.optim.config import nearest_key
    from coap_dist.train.config import RECIPES

    section, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, section) if section else cfg
    if key.startswith("strategy.extra.") and isinstance(node, DictConfig):
        return (
            f"the config has no key {key} (override {bad[0]!r}): strategy.extra holds only "
            f"the DeepSpeed JSON keys a command line adds; add it with +{bad[0]}"
        )
    if not isinstance(node, DictConfig):
        return f"the config has no key {key} (override {bad[0]!r})"
    keys = sorted(str(k) for k in node)
    recipe = RECIPES.get(str(node.get("kind"))) if section in ("optimizer", "baseline") else None
    hyper = recipe.keys() if recipe is not None else ()
    if leaf in hyper:
        return (
            f"{key} is a hyperparameter of kind={node.get('kind')} that this recipe does not "
            f"list (override {bad[0]!r}); set it with +{bad[0]}"
        )
    known = sorted({*keys, *hyper})
    near = nearest_key(leaf, known)
    hint = f"did you mean {section + '.' if section else ''}{near}? " if near else ""
    return (
        f"the config has no key {key} (override {bad[0]!r}); {hint}{section or 'the config'} "
        f"has {known}"
    )


if __name__ == "__main__":
    cli()
