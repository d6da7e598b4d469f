"""What the commands of cli.py stand on: the group that turns errors into one line, logging, and
command-line options built from the typed configs (config.py). Each config field with help
metadata is an option of every command whose config holds it, with its name, type, choices and
default taken from the field, so a setting and its default are written once. Absent options are
None, so only what the user typed overrides the config file and --set (defaults < preset <
--config < --set < options)."""
from __future__ import annotations

import dataclasses
import logging
import traceback

import click

from namedmask import config as C
from namedmask.errors import NamedMaskError

# Errors a user can act on: ours, and the operating system's (a missing file, a full disk, no
# permission). A plain ValueError or RuntimeError is a bug and keeps its traceback.
USER_ERRORS = (NamedMaskError, OSError)


class Group(click.Group):
    """The one place errors become output: options that do not go together are usage errors (exit
    code 2); any other NamedMaskError or OSError prints as `Error: <message>` with exit code 1; its
    traceback only with -vv."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except C.OptionError as exc:
            raise click.UsageError(str(exc), ctx=click.get_current_context(silent=True)) from None
        except USER_ERRORS as exc:  # (a DataLoader worker's error arrives as itself: data.training.WorkerError)
            if ctx.params.get("verbose", 0) > 1:
                traceback.print_exc()
            raise click.ClickException(str(exc)) from None


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """namedmask logs INFO by default, other libraries (open_clip, timm, ...) only warnings;
    -v: INFO from every library and DEBUG from namedmask; -vv: DEBUG everywhere; -q: warnings."""
    if quiet:
        root, ours = logging.WARNING, logging.WARNING
    else:
        root = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
        ours = logging.INFO if verbose == 0 else logging.DEBUG
    logging.basicConfig(format=LOG_FORMAT, datefmt="%H:%M:%S")  # no-op where the host set up logging
    logging.getLogger().setLevel(root)
    logging.getLogger("namedmask").setLevel(ours)



def set_threads(threads: str | None) -> None:
    """torch threads for the command: --threads N|auto (which wins over a run config's `threads`)."""
    import os

    from namedmask import runtime

    if threads is not None:
        try:
            runtime.parse_threads(threads)
        except NamedMaskError as exc:
            raise click.BadParameter(str(exc), param_hint="--threads") from None
        os.environ[runtime.THREADS_ENV] = threads  # wins over a config's `threads` (runtime.resolve_threads)
    runtime.configure_threads(threads)


PATHS = {"file": click.Path(dir_okay=False), "dir": click.Path(file_okay=False), "exists": click.Path(exists=True)}


def field_option(f: dataclasses.Field) -> click.Option:
    """The command-line option of a config field (its metadata: help, choices, flag, path)."""
    meta, default = f.metadata, f.default
    name = meta.get("flag", "--" + f.name.replace("_", "-"))
    shown = meta.get("shown", default if default not in (None, False, dataclasses.MISSING) else None)
    kw = {"help": meta["help"], "default": None, "show_default": None if shown is None else str(shown)}
    if "flag_value" in meta:  # --no-overlays sets False; --text-classes alone sets "dataset"
        kw.update(is_flag=name.startswith("--no-"), flag_value=meta["flag_value"], show_default=False)
    elif isinstance(default, bool):
        kw.update(is_flag=True, show_default=False)
    elif "choices" in meta:
        kw["type"] = click.Choice([c for c in meta["choices"] if c is not None])
    elif "path" in meta:
        kw["type"] = PATHS[meta["path"]]
    elif "float" in str(f.type):
        kw["type"] = float
    elif "int" in str(f.type):
        kw["type"] = int
    return Option([name, f.name], **kw)


class Option(click.Option):
    """Shows a default as `[default: 512]`: click puts a default given as text in parentheses."""

    def get_help_record(self, ctx):
        record = super().get_help_record(ctx)
        if record and isinstance(self.show_default, str):
            record = (record[0], record[1].replace(f"[default: ({self.show_default})]", f"[default: {self.show_default}]"))
        return record


def helped_fields(*classes) -> dict:
    """{name: field} of the fields with help, the first class's where several hold a name; a
    command's own settings first, then those of the configs and parts it is built from."""
    out = {}
    for cls in classes:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for klass in cls.__mro__:
            for name in vars(klass).get("__annotations__", {}):
                if name in fields and "help" in fields[name].metadata:
                    out.setdefault(name, fields[name])
    return out


def config_params() -> list:
    """--config FILE and repeated --set key=value (every configured command)."""
    return [click.Option(["--config", "config_path"], type=click.Path(dir_okay=False), default=None,
                         help="YAML file of this command's keys (`namedmask config show --for COMMAND` lists "
                              "them); options given on the command line win."),
            click.Option(["--set", "overrides"], multiple=True, metavar="KEY=VALUE",
                         help="Override a config value, e.g. --set optim.lr_head=1e-3 (repeatable).")]


def config_command(fn, name: str, cls, *more, images: bool = False, presets=None, extra=()) -> click.Command:
    """The command `name` running fn(cfg, given option values[, images]): its options are `cls`'s
    fields (then `more` configs' fields, passed through as given) plus --config/--set.
    `presets`: name -> settings under --config, --set and the options (cls has a `preset` key)."""
    fields = helped_fields(cls, *more)
    own = {f.name for f in dataclasses.fields(cls)}
    passed = {f.name for m in more for f in dataclasses.fields(m)} - own  # e.g. predict's zero-shot keys

    def callback(config_path, overrides, images_=None, **params):
        given = {k: v for k, v in params.items() if v is not None}
        preset = presets(given["preset"]) if presets and given.get("preset") else None
        if preset is not None or passed:  # file and --set read here: over the preset, and split off `more`'s keys
            data = C.under_preset(preset or {}, config_path, overrides)
            config_path, overrides = None, {k: v for k, v in data.items() if k not in passed}
            given = {**{k: v for k, v in data.items() if k in passed}, **given}
        try:
            cfg = C.load_config(cls, config_path, overrides, **{k: v for k, v in given.items() if k in own})
        except C.ConfigError as exc:  # a value typed on the command line: the error names its option
            if exc.key in given:
                flag = fields[exc.key].metadata.get("flag") or "--" + exc.key.replace("_", "-")
                raise C.ConfigError(f"{flag}: {exc}", exc.key) from None
            raise
        return fn(cfg, given, *(() if images_ is None else (images_,)))

    params = [click.Argument(["images_"], nargs=-1, required=True, type=click.Path(), metavar="IMAGES")] \
        if images else []
    params += [field_option(f) for f in fields.values()] + list(extra) + config_params()
    return click.Command(name, callback=callback, params=params, help=fn.__doc__)


def configured(group: click.Group, name: str, cls, *more, **kw):
    """Adds to `group` the command `name` of config `cls` (and `more`) running the decorated function."""
    def decorate(fn):
        group.add_command(config_command(fn, name, cls, *more, **kw))
        return fn
    return decorate


def require(cfg, *keys) -> None:
    missing = [k for k in keys if getattr(cfg, k) is None]
    if missing:
        raise C.OptionError("missing " + ", ".join(f"--{k.replace('_', '-')}" for k in missing)
                            + " (or set them in --config)")


