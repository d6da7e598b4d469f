"""The README stays short and true: every `namedmask ...` command it shows parses with the real
CLI (command and option names, types and choices), every link to docs/ resolves, and it stays
under 220 lines. The README's Python example is run by tests/test_api.py."""
import re
import shlex
from pathlib import Path

import click
import pytest

from namedmask.cli import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))


def shell_commands(text: str, program: str = "namedmask") -> list:
    """The `program ...` command lines of a Markdown text's bash blocks (continuations joined,
    comments and [optional] parts dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(program + " "):
                commands.append(re.sub(r"\[[^\]]*\]", "", line))
    return commands


def parse(argv: list) -> click.Context:
    """Parses argv as the CLI would, down to the leaf command, without running it."""
    ctx = cli.make_context("namedmask", list(argv))
    command, args = cli, list(ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args) + ctx.args
    while isinstance(command, click.Group):
        name, sub, args = command.resolve_command(ctx, args)
        ctx = sub.make_context(name, list(args), parent=ctx)
        command = sub
        args = list(getattr(ctx, "_protected_args", [])) + ctx.args if isinstance(sub, click.Group) else []
    return ctx


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 220


@pytest.mark.parametrize("command", shell_commands(README.read_text()))
def test_every_readme_command_parses(command, tmp_path, monkeypatch):
    """Parsed where the folders the command names (`photos/`) exist, as they would for the user."""
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)[1:]
    for arg in argv:
        if arg.endswith("/") and not arg.startswith("/"):
            (tmp_path / arg).mkdir(parents=True, exist_ok=True)
    parse(argv)


def test_the_checker_rejects_a_wrong_option():
    with pytest.raises(click.UsageError):
        parse(["train", "--no-such-option", "1"])
    with pytest.raises(click.UsageError):
        parse(["no-such-command"])


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_links_to_files_resolve(doc):
    for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", doc.read_text()):
        if "://" in target:
            continue
        assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"
