"""CLI flags generated from config dataclasses, and configs read back from parsed flags.

A config field with help text in its metadata (``config.setting``) becomes a flag (``--field-name``
unless the field names another, and any older spellings as aliases); allocator fields without help
are set with ``--<allocator>-set KEY=VALUE,...``. Flags default to None so that only what the user
typed overrides a config's own defaults; the help shows the config's default instead, the values a
flag takes and its older names. Imports nothing heavy: ``windquant --help`` builds every flag.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from windquant.config import field_types
from windquant.errors import WindquantError

SCALARS = (int, float, str, bool)


class HelpFormatter(argparse.HelpFormatter):
    """Lists a flag under its own name only (an action's ``shown`` strings); its older spellings,
    still accepted, are named at the end of its help."""

    def __init__(self, prog, indent_increment=2, max_help_position=30, width=None):
        super().__init__(prog, indent_increment, max_help_position, width)

    def _format_action_invocation(self, action):
        shown = getattr(action, "shown", None)
        if not shown:
            return super()._format_action_invocation(action)
        every = action.option_strings
        action.option_strings = shown
        try:
            return super()._format_action_invocation(action)
        finally:
            action.option_strings = every


def add_flag(parser, names: tuple[str, ...] | list[str], help: str, **kwargs) -> argparse.Action:
    """``parser.add_argument`` with ``names[0]`` the flag and the rest its older spellings: accepted,
    named in the help (``(old name ...)``), not listed beside it."""
    primary, *aliases = names
    if aliases:
        help += f" (old name{'s' if len(aliases) > 1 else ''} {', '.join(aliases)})"
    action = parser.add_argument(primary, *aliases, help=help, **kwargs)
    if aliases:
        bool_switch = isinstance(action, argparse.BooleanOptionalAction)
        action.shown = [primary, "--no-" + primary[2:]] if bool_switch else [primary]
        if bool_switch:  # its usage part lists every spelling otherwise
            action.format_usage = lambda: " | ".join(action.shown)
    return action


def flag_names(f) -> tuple[str, ...]:
    """A field's flag, then its older spellings."""
    flag = f.metadata.get("flag")
    if not flag:
        return ("--" + f.name.replace("_", "-"),)
    return (flag,) if isinstance(flag, str) else tuple(flag)


def flag_of(f) -> str:
    return flag_names(f)[0]


def shown_default(f, kind: type) -> str | None:
    """How a field's default reads in its help: on/off for switches, the value, or the field's ``shown``."""
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    if f.default is MISSING or f.default is None:
        return None
    if kind is bool:
        return "on" if f.default else "off"
    return f"{f.default:g}" if isinstance(f.default, float) else str(f.default)


def add_config_flags(
    parser,
    cls: type,
    prefix: str,
    exclude: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
    choices: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, str]:
    """Add a flag for every field of ``cls`` with help (of ``only``, when given, in that order; none
    of ``exclude``); ``choices`` lists the values of fields whose values the config cannot know
    (e.g. the registered allocators). Returns setting name -> flag."""
    types = field_types(cls)
    by_name = {f.name: f for f in fields(cls)}
    made = {}
    for name in only if only is not None else list(by_name):
        f = by_name[name]
        text = f.metadata.get("help")
        if not text or f.name in exclude:
            continue
        names, dest, kind = flag_names(f), prefix + f.name, types[f.name]
        default = shown_default(f, kind)
        text = text.replace("%", "%%") + ("" if default is None else f" (default: {default})")
        if kind is bool:
            add_flag(parser, names, text, dest=dest, action=argparse.BooleanOptionalAction, default=None)
        else:
            values = (choices or {}).get(f.name) or f.metadata.get("choices")
            metavar = "{" + ",".join(values) + "}" if values else f.metadata.get("metavar") or f.name.upper()
            add_flag(parser, names, text, dest=dest, type=kind, default=None, metavar=metavar)
        made[f.name] = names[0]
    return made


def override_fields(cls: type) -> list[str]:
    """Fields of ``cls`` settable with ``--<allocator>-set``: scalars without a flag of their own."""
    types = field_types(cls)
    return [f.name for f in fields(cls) if not f.metadata.get("help") and types[f.name] in SCALARS]


def parse_overrides(cls: type, text: str | None, flag: str) -> dict:
    """``"gamma=1.0,minibatches=2"`` -> {"gamma": 1.0, "minibatches": 2}, typed by ``cls``'s fields."""
    if not text:
        return {}
    known, types = override_fields(cls), field_types(cls)
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in known or not value:
            raise WindquantError(f"{flag}: {item!r} is not KEY=VALUE with KEY one of {', '.join(known)}")
        try:
            if types[key] is bool:
                out[key] = {"true": True, "1": True, "false": False, "0": False}[value.lower()]
            else:
                out[key] = types[key](value)
        except (KeyError, ValueError):
            raise WindquantError(f"{flag}: {key} needs a {types[key].__name__}, got {value!r}") from None
    return out


def given(args: argparse.Namespace, cls: type, prefix: str) -> dict:
    """The fields of ``cls`` the user set on the command line."""
    return {f.name: v for f in fields(cls) if (v := getattr(args, prefix + f.name, None)) is not None}


def config_from_args(args: argparse.Namespace, cls: type, prefix: str, base: dict | None = None) -> Any:
    """``cls`` with its defaults, then ``base``, then the flags the user gave."""
    return cls(**{**(base or {}), **given(args, cls, prefix)})


def set_flag(name: str) -> str:
    return f"--{name}-set"


def add_allocator_flags(parser) -> dict[str, str]:
    """One argument group per registered allocator with settings; returns setting name -> flag."""
    from windquant.alloc import ALLOCATORS

    made = {}
    for spec in ALLOCATORS.values():
        if not is_dataclass(spec.config) or not fields(spec.config):
            continue
        group = parser.add_argument_group(f"{spec.name} allocator (--allocator {spec.name})")
        made |= add_config_flags(group, spec.config, f"{spec.name}.")
        extra = override_fields(spec.config)
        if extra:
            defaults = {f.name: f.default for f in fields(spec.config)}
            shown = ", ".join(f"{k}={defaults[k]:g}" if isinstance(defaults[k], float) else f"{k}={defaults[k]}" for k in extra)
            group.add_argument(
                set_flag(spec.name),
                dest=f"{spec.name}.set",
                default=None,
                metavar="K=V,...",
                help=f"other {spec.name} settings, comma-separated KEY=VALUE (default: {shown})".replace("%", "%%"),
            )
    return made


def allocator_configs(args: argparse.Namespace, chosen: list[str]) -> dict[str, Any]:
    """Config of each chosen allocator from its flags; a flag of an allocator not chosen is an error."""
    from windquant.alloc import ALLOCATORS

    for spec in ALLOCATORS.values():
        if spec.name in chosen or not is_dataclass(spec.config):
            continue
        stray = [flag_of(f) for f in fields(spec.config) if getattr(args, f"{spec.name}.{f.name}", None) is not None]
        stray += [set_flag(spec.name)] if getattr(args, f"{spec.name}.set", None) else []
        if stray:
            raise WindquantError(f"{stray[0]} is a setting of the {spec.name} allocator; add --allocator {spec.name} or drop it")
    out = {}
    for name in chosen:
        cls = ALLOCATORS[name].config
        base = parse_overrides(cls, getattr(args, f"{name}.set", None), set_flag(name))
        out[name] = config_from_args(args, cls, f"{name}.", base)
    return out
