"""How a ``fora-export`` command ends: exit codes, one-line user errors, SIGTERM.

Exit codes: 0 success; 1 validation failed; 2 bad input (any user error, usage errors
included, printed as one line ``error: subject | problem | fix`` without a traceback);
130 interrupted (SIGINT, Ctrl-C), 143 terminated (SIGTERM); nothing is left half-written
either way. Bugs keep their traceback.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import click

from fora_runtime.errors import ForaError

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shells' convention
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143

F = TypeVar("F", bound=Callable[..., Any])


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so that every ``finally``
    and ``except BaseException`` cleanup (the build's hidden folder, atomic writes) runs."""


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def user_errors(func: F) -> F:
    """Turn ForaErrors (and a full disk) into a one-line message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ForaError as err:
            fail(str(err))
        except OSError as err:
            from fora_export.outputs import NO_SPACE, disk_full_error

            if err.errno not in NO_SPACE:
                raise
            fail(str(disk_full_error(err.filename or "(a file this command wrote)", None, err)))

    return wrapper  # type: ignore[return-value]


def usage_message(err: click.UsageError) -> str:
    """A click usage error as ``subject | problem | fix``."""
    ctx = err.ctx
    command = ctx.command_path if ctx is not None else "fora-export"
    fix = f"see `{command} --help`"
    if isinstance(err, click.NoSuchOption):
        hint = f"; did you mean {', '.join(sorted(err.possibilities))}?" if err.possibilities else ""
        return f"{err.option_name} | no such option of `{command}`{hint} | {fix}"
    if isinstance(err, click.BadParameter | click.MissingParameter) and err.param is not None:
        subject = err.param.get_error_hint(ctx) if ctx is not None else str(err.param.name)
        subject = subject.replace("'", "")
        problem = "missing" if isinstance(err, click.MissingParameter) else err.message.rstrip(".")
        return f"{subject} | {problem} | {fix}"
    return f"{command} | {err.message.rstrip('.')} | {fix}"


@contextmanager
def termination_raises() -> Iterator[None]:
    """While the CLI runs, SIGTERM raises :class:`Terminated` (main thread only)."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
