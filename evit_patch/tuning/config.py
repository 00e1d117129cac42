"""One token-reduction setting as a value: a registered method with its options, the blocks that
reduce and a keep rate for each. What the tuner measures, writes as JSON and hands back, and what
:func:`apply_config` puts on a model or :func:`recipe_fragment` on a fine-tuning run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

from torch import nn

from evit_patch.core.token_patch import apply_token_reducer
from evit_patch.reducers.registry import token_method

ModelT = TypeVar("ModelT", bound=nn.Module)


def _frozen(value: Any) -> Any:
    """A JSON value with lists as tuples, so a config holding it stays hashable."""
    return tuple(_frozen(item) for item in value) if isinstance(value, (list, tuple)) else value


def _plain(value: Any) -> Any:
    """The JSON form of a frozen value: tuples as lists."""
    return [_plain(item) for item in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class TokenConfig:
    """A registered token method (``evit_patch.reducers.registry``) with ``options`` (its
    option names and values; a per-layer option, such as the training-free variant's
    ``pooling``, as a tuple with one value per layer), reducing at ``layers`` (0-indexed
    blocks, ascending), each keeping its own share of image tokens ``keep_rates``."""

    method: str
    layers: tuple[int, ...]
    keep_rates: tuple[float, ...]
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        method = token_method(self.method)  # an unknown name: one line naming the closest
        if method.needs:
            raise ValueError(f"token method {self.method!r} needs {list(method.needs)} besides its options; "
                             "apply it with apply_token_reducer")
        known = {item.name for item in method.option_fields()}
        unknown = [name for name, _ in self.options if name not in known]
        if unknown:
            raise ValueError(f"token method {self.method!r} has no option {unknown[0]!r}; its options: {sorted(known)}")
        if not self.layers or len(self.layers) != len(self.keep_rates) or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"a config needs ascending distinct layers and one keep rate each, got layers {self.layers} "
                             f"and keep rates {self.keep_rates}")
        for name, value in self.options:
            if isinstance(value, tuple) and len(value) != len(self.layers):
                raise ValueError(f"option {name!r} gives {len(value)} values for {len(self.layers)} layers")

    @property
    def option_values(self) -> dict[str, Any]:
        return {name: _plain(value) for name, value in self.options}

    def describe(self) -> str:
        """One line: method, options, layers and keep rates."""
        options = "".join(f", {name}={'/'.join(map(str, value)) if isinstance(value, tuple) else value}"
                          for name, value in self.options)
        rates = "/".join(f"{rate:g}" for rate in self.keep_rates)
        return f"{self.method}{options} at {list(self.layers)} keep {rates}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"method", "layers", "keep_rates", "options"}``."""
        return {"method": self.method, "layers": list(self.layers), "keep_rates": list(self.keep_rates),
                "options": self.option_values}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TokenConfig":
        """The config :meth:`to_dict` wrote."""
        return cls(values["method"], tuple(int(layer) for layer in values["layers"]),
                   tuple(float(rate) for rate in values["keep_rates"]),
                   tuple((name, _frozen(value)) for name, value in values.get("options", {}).items()))


def apply_config(model: ModelT, config: TokenConfig) -> ModelT:
    """Patch ``model`` in place with ``config`` (the registry builds its reducer from its
    options; :func:`evit_patch.apply_token_reducer` puts it on) and return it."""
    reducer = token_method(config.method).build(config.option_values)
    return apply_token_reducer(model, list(config.layers), list(config.keep_rates), reducer)


def recipe_fragment(config: TokenConfig | None) -> dict[str, Any]:
    """The ``reduction`` section of a fine-tuning recipe that runs ``config`` (None: the
    unpatched model, ``enabled: false``); one keep rate when every layer has the same."""
    if config is None:
        return {"reduction": {"enabled": False}}
    rates = list(config.keep_rates)
    return {"reduction": {"enabled": True, "method": config.method, "layers": list(config.layers),
                          "keep_rate": rates[0] if len(set(rates)) == 1 else rates, **config.option_values}}
