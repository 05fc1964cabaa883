"""Settings written once: a dataclass field carries its type, default, help and choices, and both the
``saap`` verb's flags (``add_options``) and the ``saap run`` YAML section (``section_model``) are
derived from it, so the CLI, the config file and the library cannot drift apart.

    @dataclass
    class PruneSettings:
        num_samples: int = option(32, "calibration sequences")

    add_options(parser, PruneSettings)             # --num-samples N (default: 32)
    settings = from_args(PruneSettings, args)      # PruneSettings(num_samples=args.num_samples, ...)
    PruneConfig = section_model(PruneSettings)     # pydantic: prune.num_samples: int = 32, unknown keys refused

A flag is the field's name with ``-`` for ``_``; a ``bool`` that defaults to True is turned off by
``--no-NAME``; a list takes several values, each of which may also be comma-separated
(``--engines torch onnx`` or ``--engines torch,onnx``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model


def option(
    default: Any = None,
    help: str = "",
    *,
    factory: Any = None,
    choices: typing.Iterable[Any] | None = None,
    cli: bool = True,
    yaml: bool = True,
) -> Any:
    """A settings field. ``factory`` builds a mutable default (a list); ``cli`` / ``yaml`` False keep
    it out of the verb's flags / the run config (a value only code sets)."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "cli": cli, "yaml": yaml}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Option:
    name: str
    hint: Any  # the resolved annotation, e.g. int | None
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    cli: bool
    yaml: bool

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def element(self) -> type:
        """The scalar type argparse converts with (``int`` for ``list[int] | None``)."""
        return _scalar(self.hint)

    @property
    def is_list(self) -> bool:
        return _origin_list(self.hint)


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _origin_list(hint: Any) -> bool:
    return typing.get_origin(_without_none(hint)) is list


def _scalar(hint: Any) -> type:
    hint = _without_none(hint)
    if typing.get_origin(hint) is list:
        return _scalar(typing.get_args(hint)[0])
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0])
    return hint if isinstance(hint, type) else str


def options(cls: type) -> list[Option]:
    hints = typing.get_type_hints(cls)
    result = []
    for f in dataclasses.fields(cls):
        default = f.default
        if default is MISSING:
            default = f.default_factory() if f.default_factory is not MISSING else None
        meta = dict(f.metadata) or {"help": "", "choices": None, "cli": True, "yaml": True}
        result.append(Option(f.name, hints[f.name], default, **meta))
    return result


# --- the command line ----------------------------------------------------------------------------------


METAVARS = {int: "N", float: "X"}


class _ListAction(argparse.Action):
    """Several values, each of which may be comma-separated, converted to the element type."""

    def __init__(self, *args: Any, element: type = str, **kwargs: Any):
        self.element = element
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = [v.strip() for value in values for v in str(value).split(",") if v.strip()]
        try:
            setattr(namespace, self.dest, [self.element(v) for v in items])
        except ValueError:
            parser.error(f"{option_string} takes {self.element.__name__} values, not '{' '.join(values)}'")


def _help(opt: Option, default: Any) -> str:
    shown = default if not isinstance(default, list) else " ".join(map(str, default))
    if default is True:
        return f"{opt.help} (on by default; this flag turns it off)"
    if default is None or default is False or default in ([], [None]) or opt.element is bool:
        return opt.help
    return f"{opt.help} (default: {shown})" if opt.help else f"default: {shown}"


def add_options(
    parser: argparse.ArgumentParser, cls: type, exclude: typing.Iterable[str] = (), defaults: dict | None = None
) -> None:
    """One flag per field of ``cls`` (except ``exclude`` and fields with ``cli=False``); ``defaults``
    overrides a field's default for this verb only."""
    skip, defaults = set(exclude), defaults or {}
    for opt in options(cls):
        if opt.name in skip or not opt.cli:
            continue
        default = defaults.get(opt.name, opt.default)
        kwargs: dict[str, Any] = {"dest": opt.name, "default": default, "help": _help(opt, default)}
        # Choices are shown, not enforced here: the settings class checks them with a message
        # that names the flag, the same for the CLI, the run config and library callers.
        if opt.choices and opt.is_list:
            kwargs["metavar"] = opt.name.removesuffix("s").upper()
            kwargs["help"] += f"; of {', '.join(map(str, opt.choices))}"
        elif opt.choices:
            kwargs["metavar"] = "{" + ",".join(map(str, opt.choices)) + "}"
        elif opt.element in METAVARS:
            kwargs["metavar"] = METAVARS[opt.element]
        if opt.element is bool and not opt.is_list:
            flag = f"--no-{opt.flag[2:]}" if default else opt.flag
            parser.add_argument(flag, action="store_false" if default else "store_true", **kwargs)
        elif opt.is_list:
            parser.add_argument(opt.flag, nargs="+", action=_ListAction, element=opt.element, **kwargs)
        else:
            parser.add_argument(opt.flag, type=opt.element, **kwargs)


def from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """``cls`` from the parsed flags (fields without a flag keep their default unless in ``values``)."""
    present = {o.name: getattr(args, o.name) for o in options(cls) if hasattr(args, o.name)}
    return cls(**(present | values))


# --- the run config ------------------------------------------------------------------------------------


class Section(BaseModel):
    """A ``saap run`` config section; its fields are the flags of one ``saap`` verb unless in ``NOT_FLAGS``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    NOT_FLAGS: ClassVar[frozenset[str]] = frozenset()
    FLAG_DEFAULTS: ClassVar[dict[str, Any]] = {}  # the verb's own defaults, for rendering a True default as --no-X

    def flags(self) -> list[str]:
        """The section as command-line flags: unset values are left out (the verb's default applies)."""
        args: list[str] = []
        for name, value in self.model_dump().items():
            if name in self.NOT_FLAGS or value is None or value == [] or value == [None]:
                continue  # [None]: a list whose default means "let the verb choose" (threads)
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                if value != self.FLAG_DEFAULTS.get(name, False):
                    args.append(flag if value else f"--no-{flag[2:]}")
            elif isinstance(value, list):
                args += [flag, *map(str, value)]
            else:
                args += [flag, str(value)]
        return args


def _yaml_type(opt: Option) -> Any:
    """The pydantic type: choices become a Literal so a typo in the YAML names the allowed values."""
    if not opt.choices:
        return opt.hint
    choice = Literal[opt.choices]  # type: ignore[valid-type]
    hint = list[choice] if opt.is_list else choice
    return hint | None if typing.get_args(opt.hint) and type(None) in typing.get_args(opt.hint) else hint


def section_model(
    cls: type,
    name: str,
    *,
    exclude: typing.Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
    extra: dict[str, tuple[Any, Any]] | None = None,
    not_flags: typing.Iterable[str] = (),
    doc: str = "",
) -> type[Section]:
    """A pydantic section with one key per field of ``cls`` (its type, default and choices).

    ``defaults`` are the run's own choices where they differ from the verb's (the run scores
    perplexity by default, ``saap eval`` only what it is asked for); ``extra`` adds keys that are
    not settings fields (the verb's ``--data``, the run's ``enabled``); ``not_flags`` are the run's
    own keys, never passed to the verb.
    """
    skip, defaults, extra = set(exclude), defaults or {}, extra or {}
    fields: dict[str, Any] = {}
    verb_defaults = {}
    for opt in options(cls):
        if opt.name in skip or not opt.yaml:
            continue
        default = defaults.get(opt.name, opt.default)
        fields[opt.name] = (_yaml_type(opt), _pydantic_default(default))
        verb_defaults[opt.name] = opt.default
    for key, (hint, value) in extra.items():
        fields[key] = (hint, _pydantic_default(value))
    model = create_model(name, __base__=Section, __doc__=doc or cls.__doc__, **fields)
    model.NOT_FLAGS = frozenset(not_flags)
    model.FLAG_DEFAULTS = verb_defaults
    return model


def _pydantic_default(value: Any) -> Any:
    return Field(default_factory=lambda: list(value)) if isinstance(value, list) else value
