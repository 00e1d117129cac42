"""The one registry of token methods, as timm registers a model and peft a tuner.

A method is registered once, next to its reducer: its name, the factory that builds the
reducer from the method's options, the options themselves (a dataclass: names, types,
defaults), its table label, and two facts tables and training read. The recipe's choices,
``recipe_reducer``, the benchmarks' ``--methods`` and the comparison tables all read it.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from evit_patch.core.reduction import TokenReducer


@dataclass(frozen=True)
class NoOptions:
    """A method without options."""


@dataclass(frozen=True)
class TokenMethod:
    """One token method at EViT's insertion point.

    Attributes:
        name: the short name (recipes' ``reduction.method``, ``compare.py --methods``).
        label: the table label, without its budget.
        factory: builds the reducer: ``factory(**options, **needs)``.
        options: a dataclass of the method's options; each field is a key of the recipe's
            ``reduction`` section.
        needs: what the factory takes besides its options, which the caller supplies
            (``oracle``: a trained model; ``layers``: the reducing blocks).
        changes_architecture: it adds or removes parameters (a saved run's weights load only
            after it is applied).
        meaningful_untrained: its accuracy before fine-tuning tells something.
        form_of: ``(method, settings)`` when recipes also select it as that method with those
            option values (``evit`` with ``variant: training-free``).
    """

    name: str
    label: str
    factory: Callable[..., TokenReducer]
    options: type = NoOptions
    needs: tuple[str, ...] = ()
    changes_architecture: bool = False
    meaningful_untrained: bool = True
    form_of: Optional[tuple[str, Mapping[str, Any]]] = field(default=None)

    def option_fields(self) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(self.options)

    def option_types(self) -> dict[str, tuple[Any, Any]]:
        """``{option: (type, default)}``, the types resolved (not the strings of postponed annotations)."""
        hints = typing.get_type_hints(self.options)
        return {item.name: (hints[item.name], item.default) for item in self.option_fields()}

    def build(self, options: Mapping[str, Any], **needs: Any) -> TokenReducer:
        """The reducer, given values for (at least) this method's options and its needs."""
        missing = [need for need in self.needs if need not in needs]
        if missing:
            raise ValueError(f"token method {self.name!r} needs {missing}")
        own = {item.name: options[item.name] for item in self.option_fields() if item.name in options}
        return self.factory(**own, **{need: needs[need] for need in self.needs})


_METHODS: dict[str, TokenMethod] = {}


def register_token_method(method: TokenMethod) -> TokenMethod:
    """Add ``method`` to the registry; a name or an option that clashes is refused."""
    if method.name in _METHODS and _METHODS[method.name] != method:
        raise ValueError(f"a token method named {method.name!r} is registered already")
    for name, typed in method.option_types().items():
        for other in _METHODS.values():
            clash = other.option_types().get(name)
            if other.name != method.name and clash is not None and clash != typed:
                raise ValueError(f"option {name!r} of {method.name!r} is {typed}, of {other.name!r} {clash}: "
                                 "one recipe key, one type and default")
    if method.form_of is not None and method.form_of[0] not in _METHODS:
        raise ValueError(f"{method.name!r} is a form of {method.form_of[0]!r}, which is not registered")
    _METHODS[method.name] = method
    return method


def unregister_token_method(name: str) -> None:
    """Take ``name`` out of the registry (a method registered for a while, e.g. by a test)."""
    _METHODS.pop(name, None)


def token_method(name: str) -> TokenMethod:
    """The registered method ``name``; an unknown name is a one-line error with the closest one."""
    method = _METHODS.get(name)
    if method is None:
        close = difflib.get_close_matches(str(name), list(_METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"no token method {name!r}; registered: {list(_METHODS)}{hint}")
    return method


def token_methods() -> dict[str, TokenMethod]:
    """Every registered method by name, in registration order."""
    return dict(_METHODS)


def selected_method(name: str, options: Mapping[str, Any]) -> TokenMethod:
    """The method that ``name`` with ``options`` runs: ``name``'s own entry, or the form of it
    whose settings the options hold (``evit`` with ``fuse: false`` is ``evit-no-fusion``)."""
    method = token_method(name)
    for form in _METHODS.values():
        if form.form_of is not None and form.form_of[0] == name and all(
                options.get(key) == value for key, value in form.form_of[1].items()):
            return form
    return method


def option_defaults() -> dict[str, tuple[Any, Any]]:
    """``{option: (type, default)}`` over every registered method: the keys a recipe's
    ``reduction`` section may carry beside the method's name, layers and keep rate."""
    return {name: typed for method in _METHODS.values() for name, typed in method.option_types().items()}
