"""The ``k2quant`` command.

Each subcommand lives in its own module ``k2quant/bin/<verb_object>.py`` that defines a click
command named ``main``; the subcommand's name is the module name with ``_`` -> ``-``
(``prepare_an4.py`` -> ``k2quant prepare-an4``). Modules are imported only when their command
runs (or for ``--help``), and they import the library lazily, so ``k2quant size`` works without
k2 installed.

Errors: a command that fails on bad input (``ValueError`` and its subclasses such as
``PackedFormatError`` and ``UnsafeFileError``, ``OSError`` such as a missing or unwritable file,
a click usage error, an ``ImportError`` of an optional dependency, a locked output directory)
prints one line ``k2quant <command>: error: <message>`` on stderr and exits with status 2; any
other exception (a bug) prints ``k2quant <command>: internal error: <type>: <message> (run with
--debug for the traceback)`` and exits with status 1. ``--debug`` (``k2quant --debug <command>``,
or ``K2QUANT_DEBUG=1`` in the environment, e.g. for a recipe) or ``-vv`` also prints the
traceback. See :func:`error_line`.
"""
import importlib
import logging
import pkgutil
import sys
import traceback
from pathlib import Path
from typing import Optional, Tuple

import click

_BIN_DIR = Path(__file__).resolve().parent
_NOT_COMMANDS = {"cli", "__init__", "common"}


def _command_modules():
    return sorted(
        m.name for m in pkgutil.iter_modules([str(_BIN_DIR)])
        if m.name not in _NOT_COMMANDS and not m.name.startswith("_")
    )


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [m.replace("_", "-") for m in _command_modules()]

    def get_command(self, ctx, name):
        mod_name = name.replace("-", "_")
        if mod_name not in _command_modules():
            return None
        mod = importlib.import_module(f"k2quant.bin.{mod_name}")
        cmd = getattr(mod, "main", None)
        if not isinstance(cmd, click.Command):
            raise click.ClickException(
                f"k2quant/bin/{mod_name}.py must define a click command named 'main'"
            )
        return cmd

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - every error ends here, as one line
            command = "k2quant" + (f" {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "")
            show = bool(ctx.params.get("debug")) or int(ctx.params.get("verbose") or 0) >= 2
            if show and not isinstance(e, click.UsageError):
                traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
            line, code = error_line(e, command)
            click.echo(line, err=True)
            ctx.exit(code)


#: Exceptions that mean "bad input or environment" (exit status 2), not a bug in k2quant.
USER_ERRORS: Tuple[type, ...] = (ValueError, OSError, ImportError, click.ClickException)


def error_line(e: BaseException, command: str = "k2quant") -> Tuple[str, int]:
    """The one-line message and exit status for exception ``e`` raised by ``command``.

    User errors (:data:`USER_ERRORS`, k2quant's own error types included) give
    ``"<command>: error: <message>"`` and status 2; anything else
    ``"<command>: internal error: <type>: <message> (run with --debug for the traceback)"``
    and status 1. A ``UnicodeDecodeError`` names the file being decoded (found in the
    traceback) and the line of the first byte that is not UTF-8.
    """
    from k2quant.utils.rundir import DirLockedError

    decode_error = _in_chain(e, UnicodeDecodeError)
    if decode_error is not None:  # also when re-raised as another error with its bare text
        return f"{command}: error: {_unicode_message(decode_error)}", 2
    if isinstance(e, click.UsageError):
        hint = f" (see '{command} --help')"
        return f"{command}: error: {_one_line(e.format_message())}{hint}", 2
    if isinstance(e, click.ClickException):
        return f"{command}: error: {_one_line(e.format_message())}", 2
    if isinstance(e, USER_ERRORS + (DirLockedError,)):
        return f"{command}: error: {_one_line(str(e)) or type(e).__name__}", 2
    msg = _one_line(str(e))
    return (f"{command}: internal error: {type(e).__name__}"
            f"{': ' + msg if msg else ''} (run with --debug for the traceback)", 1)


def _in_chain(e: BaseException, kind: type) -> Optional[BaseException]:
    """``e`` or the first exception of type ``kind`` it was raised from (or while handling)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        if e.__cause__ is not None:
            e = e.__cause__
        else:  # ``raise ... from None`` hides the context on purpose
            e = None if e.__suppress_context__ else e.__context__
    return None


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def _decoding_file(e: BaseException) -> Optional[str]:
    """The name of the text file whose decoding raised ``e``: the innermost traceback frame
    holding an open text file object (``with open(path) as f: ...``, ``Path.read_text``)."""
    import io

    tb, found = e.__traceback__, None
    while tb is not None:
        for v in tb.tb_frame.f_locals.values():
            if isinstance(v, io.TextIOWrapper) and isinstance(getattr(v, "name", None), str):
                found = v.name
        tb = tb.tb_next
    return found


_NEWLINE = b"\n"


def _unicode_message(e: UnicodeDecodeError) -> str:
    path = _decoding_file(e)
    enc = "UTF-8" if e.encoding.replace("_", "-").lower() in ("utf-8", "utf8") else e.encoding
    bad = e.object[e.start:e.start + 1] if isinstance(e.object, (bytes, bytearray)) else b""
    byte = f"byte 0x{bad[0]:02x}" if bad else "a byte"
    if path is None:
        return f"a text file is not {enc} ({byte}: {e.reason})"
    where = ""
    try:
        if Path(path).stat().st_size <= (256 << 20):  # find the line of the first bad byte
            data = Path(path).read_bytes()
            try:
                data.decode(e.encoding)
            except UnicodeDecodeError as full:
                where = f" at line {data.count(_NEWLINE, 0, full.start) + 1}"
                byte = f"byte 0x{data[full.start]:02x}"
    except (OSError, LookupError):
        pass
    return (f"{path}: not {enc} text ({byte}{where}); k2quant reads text files as UTF-8: "
            f"convert it, e.g. iconv -f latin1 -t utf-8")


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="K2QUANT_DEBUG",
              help="Print the Python traceback of an error (also: K2QUANT_DEBUG=1).")
@click.option("-v", "--verbose", count=True, help="More logging (-v info is default, -vv debug).")
@click.version_option(package_name="k2quant")
def cli(verbose: int, debug: bool = False):
    """k2quant: compress hybrid LF-MMI ASR systems (TDNN-F + Transformer LM) with k2."""
    logging.basicConfig(
        level=logging.DEBUG if verbose >= 1 else logging.INFO,
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
    )


if __name__ == "__main__":  # pragma: no cover
    cli()
