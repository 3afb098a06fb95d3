"""Every code block of README.md and docs/ runs as written (blocks are collected from the
markdown, so a new snippet is tested without touching this file).

Each block runs in a fresh working folder holding the folders it names (tests/docs/conftest.py):

- ``python`` blocks are executed, in-process, on the CPU;
- ``bash`` blocks, command by command:
  - ``fora-export ...``: parsed by the real click CLI (every command, option and choice must
    exist); executed for real where cheap: ``--help``/``--version``, and ``info``,
    ``validate``, ``bench`` and ``triton`` on an engine folder the working folder holds (the read-only
    ones once per distinct line and session: the pages repeat the make demo lines).
    ``build``, ``quality``, ``calibrate`` and ``sample`` are parsed only: they export or sample
    demo-size models for seconds to minutes (the suite runs them on tiny models);
  - ``make ...``: every target and variable must be the Makefile's (not run: they install);
  - ``pip install ...``: checked text, not run: local paths must exist and their extras be
    declared (this machine installs from its own mirror);
  - ``python tools/X.py ...``: the tool must exist; serve_triton runs with ``--print-command``
    (it parses the line and prepares the server, without starting one), others with ``--help``;
  - ``source .venv/bin/activate``: the Makefile's venv;
  anything else fails: add a rule here or mark the block;
- ``text`` blocks (layouts, schemas, output) are not run;
- a block whose first line is ``# not run by the docs tests: REASON`` is skipped with REASON.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import pytest
import tomllib
from click.testing import CliRunner

from fora_export.cli import main
from tests.docs.blocks import LANGUAGES, REPO, CodeBlock, ShellCommand, collect_blocks, shell_commands

BLOCKS = collect_blocks()
RUN = [block for block in BLOCKS if block.language in ("python", "bash")]
#: Subcommands run for real on an engine folder the working folder holds (seconds on tiny engines).
EXECUTED = {"info", "validate", "bench", "triton"}
#: Those that write nothing, so a repeated line gives the same result and is parsed only.
READ_ONLY = {"info", "validate", "bench"}
#: The command lines already run this session.
_RAN: set[tuple[str, ...]] = set()


def test_every_block_declares_a_known_language() -> None:
    unknown = [f"{b.id} ({b.language or 'none'})" for b in BLOCKS if b.language not in LANGUAGES]
    assert not unknown, f"blocks without one of {LANGUAGES} as their fence language: {unknown}"
    assert len(RUN) >= 15  # the collector sees the pages' blocks (a parser regression finds none)


@pytest.mark.parametrize("block", RUN, ids=[block.id for block in RUN])
def test_block_runs(block: CodeBlock, docs_workdir: Path) -> None:
    if block.skip_reason:
        pytest.skip(f"{block.id}: {block.skip_reason}")
    if block.language == "python":
        code = compile(block.text, block.id, "exec")
        exec(code, {"__name__": "__docs__"})
        return
    for command in shell_commands(block):
        run_shell_command(command, block, docs_workdir)


def run_shell_command(command: ShellCommand, block: CodeBlock, workdir: Path) -> None:
    where = f"{block.path}:{command.line}: {command}"
    program, *args = command.argv
    if program == "fora-export":
        run_cli(args, command.env, where, workdir)
    elif program == "make":
        check_make(args, where)
    elif program == "pip":
        check_pip(args, where)
    elif program == "python" and args and args[0].startswith("tools/"):
        run_tool(args, where, workdir)
    elif program == "source":
        venv = makefile_variables()["VENV"]
        assert args == [f"{venv}/bin/activate"], f"{where} | not the Makefile's venv {venv}"
    else:
        pytest.fail(f"{where} | no rule for {program!r} | add one in tests/docs/test_snippets.py or mark it")


def parse_cli(args: list[str]) -> tuple[str | None, dict[str, object]]:
    """The subcommand and its parsed parameters, as click parses the line (``None`` for
    ``--help``/``--version``, which exit while parsing)."""
    try:
        ctx = main.make_context("fora-export", list(args), resilient_parsing=False)
        name, command, rest = main.resolve_command(ctx, ctx.protected_args + ctx.args)
        assert command is not None and name is not None
        sub = command.make_context(name, rest, parent=ctx, resilient_parsing=False)
    except click.exceptions.Exit as stop:
        assert stop.exit_code == 0
        return None, {}
    return name, dict(sub.params)


def run_cli(args: list[str], env: dict[str, str], where: str, workdir: Path) -> None:
    try:
        name, params = parse_cli(args)
    except click.ClickException as err:
        pytest.fail(f"{where} | the CLI refuses it: {err.format_message()}")
    engine = params.get("engine_dir")
    asks_help = any(flag in args for flag in ("--help", "-h", "--version"))
    if not asks_help and not (name in EXECUTED and isinstance(engine, Path) and (workdir / engine).is_dir()):
        return
    key = (*args, *(f"{var}={value}" for var, value in sorted(env.items())))
    if name in READ_ONLY and key in _RAN:  # the pages repeat the make demo lines: run each once
        return
    _RAN.add(key)
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, f"{where} | exit {result.exit_code}\n{result.output}"


def makefile_text() -> str:
    return (REPO / "Makefile").read_text(encoding="utf-8")


def makefile_variables() -> dict[str, str]:
    pattern = re.compile(r"^([A-Z_]+) *\??[:]?= *(.*)$", re.MULTILINE)
    return {name: value.strip() for name, value in pattern.findall(makefile_text())}


def check_make(args: list[str], where: str) -> None:
    targets = set(re.findall(r"^([A-Za-z0-9_-]+) *:(?!=)", makefile_text(), re.MULTILINE))
    variables = makefile_variables()
    assert args, f"{where} | name a target"
    for word in args:
        if "=" in word:
            assert word.partition("=")[0] in variables, f"{where} | the Makefile has no variable {word}"
        else:
            assert word in targets, f"{where} | the Makefile has no target {word!r} ({sorted(targets)})"


def check_pip(args: list[str], where: str) -> None:
    """Checked, not run: ``pip install`` with local folders that exist and declare the
    extras asked for; other requirements are left as written."""
    assert args[:1] == ["install"], f"{where} | only `pip install` lines are documented"
    words = iter(args[1:])
    for word in words:
        if word in ("--index-url", "--extra-index-url"):
            url = next(words)
            assert url.startswith("https://"), f"{where} | {url}"
        elif word == "-e" or word.startswith("."):
            spec = next(words) if word == "-e" else word
            folder, _, extras = spec.partition("[")
            pyproject = REPO / folder / "pyproject.toml"
            assert pyproject.is_file(), f"{where} | {folder} is no package folder of this repository"
            declared = tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
            for extra in filter(None, extras.rstrip("]").split(",")):
                assert extra in declared, f"{where} | {folder} declares no extra {extra!r}"


def run_tool(args: list[str], where: str, workdir: Path) -> None:
    script, *options = args
    assert (REPO / script).is_file(), f"{where} | no {script} in the repository"
    if script == "tools/serve_triton.py":
        extra = [] if "--print-command" in options else ["--print-command"]
        options = [*options, *extra, "--backend-dir", str(workdir / ".triton-backends")]
    else:
        options = ["--help"]
    path = os.pathsep.join([str(REPO), str(REPO / "runtime"), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(REPO / script), *options],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{where} | exit {done.returncode}\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize(
    ("check", "args", "message"),
    [
        (check_make, ["demoo"], "no target 'demoo'"),
        (check_make, ["test", "TORCH=x"], "no variable TORCH=x"),
        (check_pip, ["install", "-e", ".[nope]"], "declares no extra 'nope'"),
        (check_pip, ["install", "-e", "./nowhere"], "no package folder"),
    ],
)
def test_checks_refuse_what_the_repository_lacks(
    check: Callable[[list[str], str], None], args: list[str], message: str
) -> None:
    with pytest.raises(AssertionError, match=re.escape(message)):
        check(args, "page.md:1")


def test_cli_parsing_refuses_unknown_commands_options_and_choices() -> None:
    assert parse_cli(["bench", "engines/x", "--steps", "4"])[0] == "bench"
    assert parse_cli(["build", "--help"]) == (None, {})
    for args in (
        ["biuld", "demo-dit"],
        ["build", "demo-dit", "--bogus"],
        ["build", "m", "--precision", "fp8"],
    ):
        with pytest.raises(click.UsageError):
            parse_cli(args)


def test_every_option_the_cli_reference_names_exists() -> None:
    """docs/cli.md names options in its prose and tables too, not only in code blocks."""
    options = {"--help", "-h"} | {opt for param in main.params for opt in param.opts}
    for command in main.commands.values():
        for param in command.params:
            options.update([*param.opts, *param.secondary_opts])
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", (REPO / "docs" / "cli.md").read_text()))
    assert len(named) > 40 and not named - options, sorted(named - options)
