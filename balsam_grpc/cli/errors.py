"""How the CLI fails: one line on stderr, a meaningful exit code, never a traceback for
something the user did.

Exit codes: 1 for a refused or failed operation (server errors, per-item failures,
declined confirmation), 2 for bad input caught before anything is sent (typer's usage
error convention), 3 when a wait selects no jobs, 130 for Ctrl-C.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import grpc
import typer

from balsam_grpc.cli.terminal import visible
from balsam_grpc.core.errors import BalsamError

EXIT_FAILED = 1
EXIT_USAGE = 2
# `job wait` (and other commands that select jobs to watch) found none: usually a wrong
# filter, which a script must not take for success.
EXIT_NO_JOBS = 3
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """An error the CLI reports as one line, with its own exit code."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CliError):
    """Bad input found before anything was sent to the server."""

    exit_code = EXIT_USAGE


def describe(err: BaseException) -> str:
    """The one-line text of an error: the server's reason in parentheses when it has one."""
    if isinstance(err, BalsamError):
        reason = f" ({err.reason})" if err.reason and err.reason != "UNSPECIFIED" else ""
        return f"{_one_line(err.message)}{reason}"
    return _one_line(str(err))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def print_error(message: str) -> None:
    """`error: MESSAGE` on one line, with the characters that would act on the terminal
    (escape sequences, C1 controls, bidirectional overrides) shown escaped as the tables
    show them: a message may quote stored names ("your sites: ...") or the server's words."""
    sys.stderr.write(f"error: {visible(_one_line(message))}\n")
    sys.stderr.flush()


def fail(message: str, exit_code: int = EXIT_FAILED) -> NoReturn:
    raise CliError(message, exit_code)


def usage(message: str) -> NoReturn:
    raise UsageError(message)


def require_extra(extra: str, *modules: str) -> None:
    """Fail with the install command when an optional part of balsam-grpc is missing (a
    client-only install has no server, site daemon or launcher)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"this command needs the {extra!r} extra ({', '.join(missing)} not installed): "
             f"pip install 'balsam-grpc[{extra}]'")


def from_rpc_error(err: grpc.RpcError) -> BalsamError:
    from balsam_grpc.sdk.errors import error_from_rpc

    return error_from_rpc(err)


def _is_click_error(err: Exception) -> bool:
    """Typer's vendored click errors (UsageError, BadParameter, Abort...), recognised by
    their module so the private package path is not imported."""
    return type(err).__module__.split(".")[:2] == ["typer", "_click"]


class BalsamTyper(typer.Typer):
    """The root app: turns the errors a user can cause into one line and an exit code.

    Typer re-raises anything a command raises (after tagging it for its pretty traceback
    hook); catching here, around the whole command tree, covers every subcommand,
    including those other modules register.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Not standalone: typer's own usage errors (a missing option, a bad integer) come
        # here too, so they also end as one line instead of a framed box.
        kwargs.setdefault("standalone_mode", False)
        try:
            result = super().__call__(*args, **kwargs)
        except CliError as err:
            print_error(err.message)
            sys.exit(err.exit_code)
        except BalsamError as err:
            print_error(describe(err))
            sys.exit(EXIT_FAILED)
        except grpc.RpcError as err:
            print_error(describe(from_rpc_error(err)))
            sys.exit(EXIT_FAILED)
        except KeyboardInterrupt:
            sys.stderr.write("\ninterrupted\n")
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # `balsamctl job ls | head`: the reader left; not an error worth a traceback.
            sys.stderr.close()
            sys.exit(EXIT_FAILED)
        except Exception as err:
            if not _is_click_error(err):
                raise
            if type(err).__name__ == "Abort":
                print_error("aborted")
                sys.exit(EXIT_FAILED)
            message = err.format_message()  # type: ignore[attr-defined]
            if message:  # empty after no_args_is_help has shown the help
                command = getattr(getattr(err, "ctx", None), "command_path", "")
                print_error(f"{message}" + (f" (see: {command} --help)" if command else ""))
            sys.exit(getattr(err, "exit_code", EXIT_USAGE))
        # Not standalone, click returns the code of a typer.Exit instead of exiting.
        sys.exit(result if isinstance(result, int) else 0)
