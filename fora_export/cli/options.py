"""Option groups the commands share, each handing its command one parsed value.

A group is a decorator adding its click options (in ``--help`` order) and replacing their
values by one argument: :func:`folder_options` gives ``access`` (a
``fora_runtime.trust.FolderAccess``), :func:`json_options` gives ``output`` (a
:class:`JsonOutput`). List options are parsed once, by :func:`parse_int_list` and
:func:`parse_names`, as click callbacks: a bad list is a one-line error before any work.
Choices come from the library's own constants (``fora_export.choices``, the runtime's
backends and schedule modes), imported without torch so ``--help`` stays instant. Help
texts stay per command; the group takes them as arguments.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from fora_export.adapters import registry
from fora_export.cli.exits import user_errors
from fora_export.errors import ConfigError
from fora_export.schedulers import SCHEDULER_NAMES
from fora_export.schedules import SCHEDULE_CHOICES
from fora_runtime.manifest import VERIFY_MODES

F = TypeVar("F", bound=Callable[..., Any])

#: Seeds go to torch and numpy generators: non-negative int64 (larger ones overflow there).
SEED = click.IntRange(0, 2**63 - 1)
#: The demo pipelines ``--pipeline`` takes besides a folder (validate, sample).
DEMO_PIPELINES_HELP = "a built-in demo pipeline: " + ", ".join(registry.demo_pipeline_names())
#: ``--verify`` modes a user picks (``none`` is the library's, for folders checked already).
USER_VERIFY_MODES = tuple(mode for mode in VERIFY_MODES if mode != "none")


# -- parsers ------------------------------------------------------------------------------
def parse_int_list(text: str, option: str, example: str) -> tuple[int, ...]:
    """``"1,2,3"`` as integers, or the one-line error naming the option."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise ConfigError(f"{option} | got {text!r} | expected integers like {example}") from err
    if not values:
        raise ConfigError(f"{option} | got {text!r} | expected integers like {example}")
    return values


def parse_names(text: str) -> tuple[str, ...]:
    """``"a, b"`` as ``("a", "b")``: comma-separated names, blanks dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _option_name(param: click.Parameter) -> str:
    return param.opts[0] if isinstance(param, click.Option) else str(param.name)


def int_list(example: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback parsing an option's ``1,2,3`` (each of them, for a repeatable option;
    None stays None) with :func:`parse_int_list`."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple(parse_int_list(text, _option_name(param), example) for text in value)
        return parse_int_list(value, _option_name(param), example)

    return callback


def _names(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    return parse_names(value)


# -- groups -------------------------------------------------------------------------------
def option_group(target: str, make: Callable[..., Any], *options: Callable[[Any], Any]) -> Callable[[F], F]:
    """A decorator adding ``options`` (top to bottom as ``--help`` lists them) to a command and
    handing it, instead of their values, ``target=make(**values)`` (a ForaError from ``make``
    is the command's one-line error)."""

    def decorate(func: F) -> F:
        names: list[str] = []

        def call(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            return func(*args, **{target: make(**values)}, **kwargs)

        wrapper = functools.update_wrapper(user_errors(call), func)
        before = len(getattr(wrapper, "__click_params__", ()))
        decorated: Any = wrapper
        for option in reversed(options):  # click lists the last one applied first
            decorated = option(decorated)
        names.extend(str(param.name) for param in decorated.__click_params__[before:])
        return decorated  # type: ignore[no-any-return]

    return decorate


def _folder_access(trust_programs: bool, verify: str, key_file: Path | None) -> Any:
    from fora_runtime.trust import FolderAccess

    return FolderAccess(verify=verify, trust_programs=trust_programs, manifest_key_file=key_file)


def folder_options() -> Callable[[F], F]:
    """``--trust``, ``--verify``, ``--key-file``: how ENGINE_DIR is opened, passed to the
    command as ``access`` (a ``fora_runtime.trust.FolderAccess``)."""
    return option_group(
        "access",
        _folder_access,
        click.option(
            "--trust",
            "trust_programs",
            is_flag=True,
            help="Vouch for ENGINE_DIR: load its torch programs (they run code when loaded) and "
            "TensorRT plugin layers. Only for folders you built or trust (see docs/trust.md).",
        ),
        click.option(
            "--verify",
            type=click.Choice(USER_VERIFY_MODES),
            default="stamp",
            show_default=True,
            help="How ENGINE_DIR's files are checked: stamp (size, first/last MiB and samples) or full "
            "(sha256 of every byte).",
        ),
        click.option(
            "--key-file",
            type=click.Path(path_type=Path),
            default=None,
            help="The deployer's manifest key: refuse ENGINE_DIR unless signed with it. "
            "[default: $FORA_MANIFEST_KEY if set]",
        ),
    )


@dataclass(frozen=True)
class JsonOutput:
    """``--json`` (print the report as JSON) and ``--save-json FILE`` (also write it there)."""

    as_json: bool = False
    save_json: Path | None = None

    def check(self) -> None:
        """Refuse, before any work, a ``--save-json`` file that cannot be written."""
        from fora_export.outputs import check_output_file

        check_output_file(self.save_json, "--save-json")

    def emit(self, data: dict[str, Any], print_text: Callable[[], None]) -> None:
        """Write the report to ``--save-json``, then print it: as JSON with ``--json``, else
        through ``print_text``."""
        text = json.dumps(data, indent=2)
        if self.save_json is not None:
            from fora_export.outputs import write_text_atomic

            write_text_atomic(self.save_json, text + "\n", "--save-json")
        if self.as_json:
            click.echo(text)
        else:
            print_text()


def json_options(help: str, *, save_json_help: str | None = None) -> Callable[[F], F]:
    """``--json`` (and, given its help, ``--save-json``), passed as ``output``: a :class:`JsonOutput`."""
    options = [click.option("--json", "as_json", is_flag=True, help=help)]
    if save_json_help is not None:
        options.append(
            click.option("--save-json", type=click.Path(path_type=Path), default=None, help=save_json_help)
        )
    return option_group("output", JsonOutput, *options)


class LoadedChoice(click.Choice):  # type: ignore[type-arg]
    """A ``click.Choice`` whose values ``load()`` returns when they are first needed (the
    command's own help, parsing its arguments): the constants of a module slow to import
    (numpy's) stay out of the group's ``--help``."""

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load = load
        self.case_sensitive = True

    @functools.cached_property
    def choices(self) -> Sequence[str]:  # type: ignore[override]
        return tuple(self._load())


# -- single options with one meaning in every command ------------------------------------
def engine_dir_argument() -> Callable[[F], F]:
    return click.argument("engine_dir", type=click.Path(path_type=Path))


def seed_option(default: int, help: str | None = None) -> Callable[[F], F]:
    return click.option("--seed", type=SEED, default=default, show_default=True, help=help)


def runtime_backend_option(help: str) -> Callable[[F], F]:
    """``--backend NAME``: the runtime backend a command runs the engines on."""
    return click.option("--backend", default="onnxruntime", show_default=True, help=help)


def runtime_backends_option(help: str) -> Callable[[F], F]:
    """``--backend A,B``: runtime backends, comma-separated, passed as a tuple of names."""
    return click.option("--backend", default="onnxruntime", show_default=True, help=help, callback=_names)


def intervals_option(default: str, help: str, *, example: str = "1,2,3,5") -> Callable[[F], F]:
    """``--intervals 1,2,3``: cache intervals, passed as a tuple of integers."""
    return click.option(
        "--intervals", default=default, show_default=True, help=help, callback=int_list(example)
    )


def schedule_mode_option(modes: Sequence[str], default: str | None, help: str) -> Callable[[F], F]:
    """``--schedule-mode``: how intervals are counted (``fora_runtime.schedule.INTERVAL_MODES``)."""
    return click.option(
        "--schedule-mode",
        type=click.Choice(tuple(modes)),
        default=default,
        show_default=default is not None,
        help=help,
    )


def schedule_option() -> Callable[[F], F]:
    """``--schedule manifest|calibrated`` (validate, sample)."""
    return click.option(
        "--schedule",
        "schedule",
        type=click.Choice(SCHEDULE_CHOICES),
        default=None,
        help="Cache schedule: the manifest's, or calibrated (the one fora-export calibrate wrote for "
        "--steps). [default: manifest]",
    )


def scheduler_option(help: str) -> Callable[[F], F]:
    """``--scheduler``: the sampling scheduler (``fora_export.schedulers``)."""
    return click.option("--scheduler", type=click.Choice(SCHEDULER_NAMES), default=None, help=help)


def image_option(name: str, help: str) -> Callable[[F], F]:
    """An image file to write (``--plot``, ``--grid``)."""
    return click.option(name, type=click.Path(path_type=Path), default=None, help=help)
