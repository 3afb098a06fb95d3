"""The ``fora-export`` command group: logging, and every way out in one place.

Each command lives in its own module of this package (parse -> call -> print); the work is
done below, in ``fora_export.builder``, ``validate``, ``bench``, ``quality``, ``calibrate``,
``sample`` and ``serving``, imported inside the command bodies so ``--help`` stays instant.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import click

from fora_export.cli.bench import bench
from fora_export.cli.build import build
from fora_export.cli.calibrate import calibrate
from fora_export.cli.exits import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Terminated,
    fail,
    termination_raises,
    usage_message,
)
from fora_export.cli.info import info
from fora_export.cli.quality import quality
from fora_export.cli.sample import sample
from fora_export.cli.triton import triton
from fora_export.cli.validate import validate
from fora_runtime.errors import ForaError


class ForaGroup(click.Group):
    """The command group, with every way out in one place: usage errors and user errors as
    one line with exit 2, SIGINT 130, SIGTERM 143."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        with termination_raises():
            try:
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except click.UsageError as err:
                if isinstance(err, getattr(click.exceptions, "NoArgsIsHelpError", ())):
                    err.show()  # `fora-export` alone: the help, as click prints it
                    sys.exit(EXIT_BAD_INPUT)
                fail(usage_message(err), EXIT_BAD_INPUT)
            except ForaError as err:  # raised outside a command body (an option callback)
                fail(str(err))
            except click.ClickException as err:  # e.g. a file click could not open
                fail(f"fora-export | {err.format_message()} | see `fora-export --help`", err.exit_code)
            except click.Abort as err:  # click's wrapping of KeyboardInterrupt (and EOF)
                cause = (
                    "interrupted (Ctrl-C)" if isinstance(err.__context__, KeyboardInterrupt) else "aborted"
                )
                fail(f"fora-export | {cause} | nothing was left half-written; rerun", EXIT_INTERRUPTED)
            except KeyboardInterrupt:
                fail(
                    "fora-export | interrupted (Ctrl-C) | nothing was left half-written; rerun",
                    EXIT_INTERRUPTED,
                )
            except Terminated:
                fail(
                    "fora-export | terminated (SIGTERM) | nothing was left half-written; rerun",
                    EXIT_TERMINATED,
                )
        sys.exit(code if isinstance(code, int) else 0)


def setup_logging(verbose: int, quiet: bool) -> None:
    levels = {0: logging.WARNING, 1: logging.INFO}
    level = logging.ERROR if quiet else levels.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    # Third-party INFO chatter (torch.onnx, diffusers) stays out unless -vv.
    for noisy in ("torch", "diffusers", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


@click.group(cls=ForaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fora-export")
@click.option("-v", "--verbose", count=True, help="-v: stage timings; -vv: debug, incl. exporter output.")
@click.option("-q", "--quiet", is_flag=True, help="Errors only (no warnings).")
def main(verbose: int, quiet: bool) -> None:
    """Export diffusion transformers as FORA full/reuse graphs, validate and benchmark them."""
    setup_logging(verbose, quiet)


for command in (build, validate, bench, triton, quality, calibrate, info, sample):
    main.add_command(command)
