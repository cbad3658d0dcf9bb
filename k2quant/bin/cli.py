"""The ``k2quant`` command.

Each subcommand lives in its own module ``k2quant/bin/<verb_object>.py`` that defines a click
command named ``main``; the subcommand's name is the module name with ``_`` -> ``-``
(``prepare_an4.py`` -> ``k2quant prepare-an4``). Modules are imported only when their command
runs (or for ``--help``), and they import the library lazily, so ``k2quant size`` works without
k2 installed.
"""
import importlib
import logging
import pkgutil
from pathlib import Path

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


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info is default, -vv debug).")
@click.version_option(package_name="k2quant")
def cli(verbose: int):
    """k2quant: compress hybrid LF-MMI ASR systems (TDNN-F + Transformer LM) with k2."""
    logging.basicConfig(
        level=logging.DEBUG if verbose >= 1 else logging.INFO,
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
    )


if __name__ == "__main__":  # pragma: no cover
    cli()
