"""Search spaces written in YAML: dotted config keys -> distribution expressions.

    fmray tune --config jobs/tune/sft_tiny.yaml      # a search whose space is written as below
    python -c "from fmray.tune.space import parse_distribution; help(parse_distribution)"

    search_space:
      train.lr: loguniform(1e-5, 1e-3)     # log-uniform float in [low, high]
      train.warmup_steps: randint(0, 20)   # integer in [low, high) (Ray Tune's convention)
      train.weight_decay: uniform(0.0, 0.1)
      lora.r: choice([4, 8, 16])           # one of the listed values
      train.micro_batch_size: grid([4, 8]) # every value, each with num_samples trials

Expressions are parsed with `ast.literal_eval` (no code runs). A bad expression, an unknown key
or a value the recipe's config would reject fails with one line naming the key, before Ray starts.
"""

from __future__ import annotations

import ast
import copy
import math
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from fmray.config import ConfigError, section_type, validate_config

DISTRIBUTIONS = {
    "loguniform": "loguniform(low, high) with 0 < low < high",
    "uniform": "uniform(low, high) with low < high",
    "randint": "randint(low, high) with integers low < high (high excluded)",
    "choice": "choice([v1, v2, ...]) with at least one value",
    "grid": "grid([v1, v2, ...]) with at least one value",
}
EXPRESSION = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Distribution:
    """One parsed search dimension."""

    kind: str
    args: tuple[Any, ...]

    def extremes(self) -> list[Any]:
        """Values a config must accept: the bounds, or every listed value."""
        if self.kind in ("choice", "grid"):
            return list(self.args[0])
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind in ("choice", "grid"):
            values = list(self.args[0])
            return tune.choice(values) if self.kind == "choice" else tune.grid_search(values)
        return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[
            self.kind
        ](*self.args)


def parse_distribution(key: str, expression: Any) -> Distribution:
    """`'loguniform(1e-5, 1e-3)'` -> Distribution; one-line ConfigError naming the key."""
    allowed = "; ".join(DISTRIBUTIONS.values())
    match = EXPRESSION.match(expression) if isinstance(expression, str) else None
    if match is None or match.group(1) not in DISTRIBUTIONS:
        raise ConfigError(
            f"config error: search_space.{key}={expression!r} is not a distribution "
            f"(allowed: {allowed})"
        )
    kind, raw_args = match.group(1), match.group(2)
    try:
        args = ast.literal_eval(f"({raw_args},)") if raw_args.strip() else ()
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"config error: search_space.{key}={expression!r}: arguments must be literals "
            f"(allowed: {DISTRIBUTIONS[kind]})"
        ) from None
    if not arguments_ok(kind, args):
        raise ConfigError(
            f"config error: search_space.{key}={expression!r}: expected {DISTRIBUTIONS[kind]}"
        )
    return Distribution(kind, args)


def arguments_ok(kind: str, args: tuple[Any, ...]) -> bool:
    if kind in ("choice", "grid"):
        return len(args) == 1 and isinstance(args[0], list) and len(args[0]) > 0
    numbers = len(args) == 2 and all(
        isinstance(a, int | float) and not isinstance(a, bool) and math.isfinite(a) for a in args
    )
    if not numbers or not args[0] < args[1]:
        return False
    if kind == "randint":
        return all(isinstance(a, int) for a in args)
    return kind != "loguniform" or args[0] > 0


def check_key(config_class: type[BaseModel], key: str) -> None:
    """The dotted key must name a leaf field of the recipe's config."""
    model: Any = config_class
    parts = key.split(".")
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            prefix = ".".join(parts[:depth])
            allowed = ", ".join(model.model_fields) if model is not None else "none"
            where = f" under {prefix}" if prefix else ""
            raise ConfigError(
                f"config error: search_space key {key!r} is unknown (allowed{where}: {allowed})"
            )
        model = section_type(field.annotation)
    if model is not None:
        raise ConfigError(
            f"config error: search_space key {key!r} is a section; name one of its keys "
            f"({', '.join(f'{key}.{k}' for k in model.model_fields)})"
        )


def parse_search_space(
    config_class: type[BaseModel], space: dict[str, Any]
) -> dict[str, Distribution]:
    """Every key checked against the recipe's config, every expression parsed."""
    if not space:
        raise ConfigError(
            "config error: search_space is empty (e.g. train.lr: loguniform(1e-5, 1e-3))"
        )
    parsed = {}
    for key, expression in space.items():
        check_key(config_class, key)
        parsed[key] = parse_distribution(key, expression)
    return parsed


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the recipe config `base` with dotted `params` set (a null section becomes one)."""
    tree = copy.deepcopy(base)
    for key, value in params.items():
        parts = key.split(".")
        node = tree
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return tree


def check_values(
    config_class: type[BaseModel], base: dict[str, Any], space: dict[str, Distribution]
) -> None:
    """Each distribution's extreme values must make a valid recipe config."""
    for key, distribution in space.items():
        for value in distribution.extremes():
            try:
                validate_config(config_class, apply_params(base, {key: value}))
            except ConfigError as err:
                reason = str(err).removeprefix("config error: ")
                raise ConfigError(
                    f"config error: search_space.{key} can take {value!r}, "
                    f"which the recipe rejects: {reason}"
                ) from None
