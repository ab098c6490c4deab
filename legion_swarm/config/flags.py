"""Command-line flags generated from config dataclasses: one flag per field, its help taken from the field's doc.

The rule, for a field ``name`` of a config class placed in section ``section`` (``model``, ``data``, ``train``,
``collective`` of the swarm config):

- the flag is ``--<section>-<name>`` with ``_`` written ``-`` (``--collective-reduce-timeout-s``), unless the
  field's metadata names it (``field(metadata=cli("compress"))`` gives ``--compress``): the short names users
  and the README already know (``--mode``, ``--compress``, ``--lr``, ``--model``, ``--data``...);
- ``cli(None)`` keeps a field off the command line (the reason is a comment at the field);
- the type comes from the annotation (``int``, ``float`` or ``str``, optionally ``| None``), the choices and
  metavar from the metadata; the help is the field's docstring plus its dataclass default;
- every flag defaults to ``None``, meaning "not given": the config file's, the checkpoint's or the dataclass's
  value applies. ``None`` cannot be given on the command line, as in TOML, which has no null either.

Field docstrings are not kept at runtime, so :func:`field_docs` reads them from the class source with
:mod:`ast` (the string literal statement right after each annotated field). Values are only parsed here; the
dataclass's ``__post_init__`` validates them when the config is built (a :class:`~legion_swarm.errors.ConfigError`,
which the CLI reports as one line and exit code 2).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import re
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_UNSET = object()
_METAVARS = {int: "N", float: "X", str: "TEXT"}


def cli(flag: str | object | None = _UNSET, *, choices: Sequence[str] | None = None, metavar: str | None = None):
    """Field metadata for flag generation: ``flag`` replaces the ``<section>-<name>`` flag (``None``: no flag),
    ``choices`` restricts the accepted values, ``metavar`` names the value in ``--help``."""
    meta: dict[str, Any] = {}
    if flag is not _UNSET:
        meta["flag"] = flag
    if choices is not None:
        meta["choices"] = tuple(choices)
    if metavar is not None:
        meta["metavar"] = metavar
    return meta


@dataclass(frozen=True, kw_only=True)
class Flag:
    """One generated flag and the config field it sets."""

    section: str
    """Swarm config section of the field (``train``, ``collective``...)."""
    name: str
    """The field's name in its dataclass."""
    option: str
    """The flag as typed, ``--compress``."""
    type: type
    """``int``, ``float`` or ``str``: what the flag's text is parsed into."""
    choices: tuple[str, ...] | None
    """Accepted values, or ``None`` for any value of ``type``."""
    metavar: str | None
    """Name of the value in ``--help`` (``None`` when ``choices`` list the values)."""
    help: str
    """The field's docstring and its default, as ``--help`` shows it."""

    def __post_init__(self) -> None:
        if not self.option.startswith("--") or not self.help.strip():
            raise ValueError(f"flag {self.option!r} of {self.section}.{self.name} needs a --name and a help text")
        if self.type not in _METAVARS:
            raise TypeError(f"{self.section}.{self.name}: no flag for fields of type {self.type!r}")

    @property
    def dest(self) -> str:
        """Attribute of the parsed namespace: ``--inner-steps`` is ``args.inner_steps``."""
        return self.option[2:].replace("-", "_")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field name: docstring}`` of a dataclass, read from its source; fields without a docstring are absent."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, after in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _base_type(annotation: Any) -> type:
    """``int`` for ``int`` and ``int | None``; the annotation itself for anything else (refused by :class:`Flag`)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _help(doc: str, default: Any) -> str:
    text = re.sub(r"\s+", " ", doc.replace("``", "")).strip()
    shown = "unset" if default is None else default
    # argparse %-formats help strings.
    return f"{text} (default: {shown})".replace("%", "%%")


@functools.cache
def config_flags(cls: type, section: str) -> tuple[Flag, ...]:
    """The flags of ``cls``'s fields, in field order, skipping fields marked ``cli(None)``."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    flags = []
    for f in dataclasses.fields(cls):
        option = f.metadata.get("flag", f"{section}-{f.name}".replace("_", "-"))
        if option is None:
            continue
        base = _base_type(hints[f.name])
        choices = f.metadata.get("choices")
        flags.append(
            Flag(
                section=section,
                name=f.name,
                option=f"--{option}",
                type=base,
                choices=choices,
                metavar=None if choices else f.metadata.get("metavar", _METAVARS.get(base)),
                help=_help(docs.get(f.name, ""), _default_of(f)),
            )
        )
    return tuple(flags)


def _parser_of(kind: type):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def add_config_flags(parser: argparse.ArgumentParser, cls: type, section: str, *, note: str = "") -> None:
    """Add one flag per field of ``cls`` (see the module's rule) to a ``[section]`` group of ``parser``."""
    group = parser.add_argument_group(f"[{section}] settings", note or None)
    for flag in config_flags(cls, section):
        group.add_argument(
            flag.option, dest=flag.dest, default=None, choices=flag.choices, metavar=flag.metavar, help=flag.help,
            type=str if flag.type is str else _parser_of(flag.type),
        )  # fmt: skip


def config_overrides(args: argparse.Namespace, sections: Mapping[str, type]) -> dict[str, dict[str, Any]]:
    """The flags given on the command line as ``{section: {field: value}}``; flags not given are absent."""
    out: dict[str, dict[str, Any]] = {}
    for section, cls in sections.items():
        for flag in config_flags(cls, section):
            value = getattr(args, flag.dest, None)
            if value is not None:
                out.setdefault(section, {})[flag.name] = value
    return out


def flags_argv(overrides: Mapping[str, Mapping[str, Any]], sections: Mapping[str, type]) -> list[str]:
    """Inverse of :func:`config_overrides`: the command line that gives these values (for child processes)."""
    argv: list[str] = []
    for section, values in overrides.items():
        options = {flag.name: flag.option for flag in config_flags(sections[section], section)}
        for name, value in values.items():
            argv += [options[name], str(value)]
    return argv


def option_of(cls: type, section: str, name: str) -> str:
    """The flag that sets ``section.name`` (``--compress`` for ``train.codec``); ``section.name`` if none does."""
    for flag in config_flags(cls, section):
        if flag.name == name:
            return flag.option
    return f"{section}.{name}"
