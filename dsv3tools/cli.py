"""The ``dsv3tools`` command line: one typer app; every command lives in ``dsv3tools/commands/`` and calls a
library function. Errors are handled here, once: bad input exits 2 with one line, anything else exits 1."""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import typer

from dsv3tools.errors import DSV3Error


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """Click's exception class ``name`` from click itself and from typer's vendored copy (typer >= 0.2x
    raises the latter), whichever are installed."""
    found = []
    for mod in ("typer._click.exceptions", "click.exceptions", "typer.exceptions"):
        try:
            cls = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            continue
        if cls is not None and cls not in found:
            found.append(cls)
    return tuple(found)


USAGE_ERRORS = _click_classes("ClickException")
EXITS = (*_click_classes("Exit"), typer.Exit)
ABORTS = (*_click_classes("Abort"), typer.Abort)

COMMAND_MODULES = [
    "synth",
    "inspect",
    "download",
    "convert",
    "split",
    "reshard",
    "expert_load",
    "generate",
    "compare",
    "eval",
    "mtp_bench",
    "demo",
]

app = typer.Typer(
    name="dsv3tools",
    help="Download, split, re-quantize, reshard and verify the DeepSeek-V3 checkpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _m in COMMAND_MODULES:
    importlib.import_module(f"dsv3tools.commands.{_m}").register(app)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns (and exits with) 0, 1 or 2 per SPEC sec. 2."""
    try:
        app(args=argv, standalone_mode=False)
        code = 0
    except DSV3Error as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        code = 2
    except EXITS as e:
        code = e.exit_code
    except USAGE_ERRORS as e:
        e.show()
        code = 2
    except ABORTS:
        print("aborted", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        code = 130
    except Exception as e:  # anything unexpected: keep the traceback for the bug report
        if os.environ.get("DSV3TOOLS_DEBUG"):
            traceback.print_exc()
        else:
            traceback.print_exc(limit=-3)
        print(f"unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
