"""The ``e3relax-ase`` entry point.

Subcommands live in their own modules and are imported only when invoked, so that
``e3relax-ase --help`` does not import torch.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from e3relax_ase import __version__

# name -> "module:attribute" of a click.Command; add a subcommand by adding a line here.
SUBCOMMANDS = {
    "relax": ("e3relax_ase.cli.relax_cmd:relax", "Relax crystal structures in one shot."),
    "info": ("e3relax_ase.cli.info_cmd:info", "Show a checkpoint's config, data, metrics and sha256."),
    "train": ("e3relax_ase.cli.train_cmd:train", "Train a checkpoint from a YAML config."),
    "evaluate": ("e3relax_ase.cli.evaluate_cmd:evaluate", "Evaluate a checkpoint on a pair dataset."),
    "make-pairs": ("e3relax_ase.cli.make_pairs_cmd:make_pairs", "Distil training pairs from seeds with any ASE calculator."),
    "data": ("e3relax_ase.cli.data_cmd:data", "Import, split, describe and plot pair datasets."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx):
        return sorted(name for name in SUBCOMMANDS if self._available(name))

    def _available(self, name):
        module = SUBCOMMANDS[name][0].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx, name):
        if name not in SUBCOMMANDS or not self._available(name):
            return None
        module_name, attr = SUBCOMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, SUBCOMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def configure_logging(verbosity: int) -> None:
    """Quiet by default (warnings only); -v for info, -vv for debug; -q for errors only."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="e3relax-ase")
def cli():
    """e3relax-ase: predict relaxed crystal structures in one forward pass (E3Relax-H2)."""
    # Warnings reach stderr formatted as one line each; subcommands may raise or lower the level.
    configure_logging(0)


def main(argv=None) -> int:
    """Run the CLI; returns the exit code (callable from tests)."""
    try:
        # Without standalone mode click returns ctx.exit()'s code instead of raising it.
        result = cli.main(args=argv, prog_name="e3relax-ase", standalone_mode=False)
        if isinstance(result, int):
            return result
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted.", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
