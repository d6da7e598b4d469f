"""The command line as a new user meets it: --version, help on every option, what -v/-q
change, defaults that agree, `prepare check --dataset folder`."""
import logging

import click
import pytest
from click.testing import CliRunner

from namedmask import __version__
from namedmask.cli import cli, setup_logging
from namedmask.config import ArchiveConfig
from synthetic import write_labeled_folder


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        elif not cmd.hidden:
            yield (*prefix, name), cmd


def test_version():
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output


def test_every_option_has_help():
    missing = [f"{' '.join(name)} {p.opts[0]}" for name, cmd in _commands(cli) for p in cmd.params
               if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    missing += [p.opts[0] for p in cli.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not missing, missing


@pytest.fixture
def restore_levels():
    loggers = [logging.getLogger(), logging.getLogger("namedmask")]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


@pytest.mark.parametrize("verbose,quiet,root,ours", [(0, False, logging.WARNING, logging.INFO),
                                                     (1, False, logging.INFO, logging.DEBUG),
                                                     (2, False, logging.DEBUG, logging.DEBUG),
                                                     (0, True, logging.WARNING, logging.WARNING)])
def test_verbosity_levels(verbose, quiet, root, ours, restore_levels):
    """Other libraries' INFO lines (open_clip logs 'INFO root: ...' on every load) only from -v."""
    setup_logging(verbose, quiet)
    assert logging.getLogger().level == root and logging.getLogger("namedmask").level == ours
    assert logging.getLogger("open_clip").getEffectiveLevel() == root
    assert logging.getLogger("namedmask.training").getEffectiveLevel() == ours


def test_devices_default_to_auto():
    assert ArchiveConfig().device == "auto"
    assert "[default: auto]" in CliRunner().invoke(cli, ["build-archive", "--help"]).output


def test_prepare_check_knows_folder_sets(tmp_path):
    root = write_labeled_folder(tmp_path / "val", count=3, size=32)
    res = CliRunner().invoke(cli, ["prepare", "check", "--dataset", "folder", "--root", str(root)])
    assert res.exit_code == 0, res.output
    assert "3 labelled images ready" in res.output
    res = CliRunner().invoke(cli, ["prepare", "check", "--dataset", "folder", "--root", str(tmp_path / "none")])
    assert res.exit_code == 1 and "MISSING" in res.output
