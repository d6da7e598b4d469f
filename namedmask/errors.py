"""The four kinds of error a user can act on, and their one base.

The CLI catches `NamedMaskError` in one place and prints its message as one line (a traceback
only with -vv); library callers catch it to tell "fix your input" from a bug, or one kind:

- `BadInputError`: a bad option, config value or user file; the message names it and what to do.
- `SkippableItemError`: one bad item among many (an image, a mask, a pair) that `--skip-bad`
  may skip; a kind of bad input.
- `OutputStateError`: an output folder or a run's state that a command cannot use (not ours,
  locked, full, made with other settings, interrupted in a way it cannot resume).
- `UnavailableError`: something the machine lacks: weights, a device, a backend, an optional
  package; the message says where it was looked for and how to provide it.

A module's own error class (ConfigError, DiscoverError, ...) derives from exactly one kind and
keeps the builtin base it had before (ValueError, RuntimeError, ...), so code that caught
those still works."""
from __future__ import annotations


class NamedMaskError(Exception):
    """An error whose message says what is wrong with the input and what to do."""


class BadInputError(NamedMaskError, ValueError):
    """A bad option, config value or user file; the message names it and what to do."""


class SkippableItemError(BadInputError):
    """One bad item among many (an image, a mask, a pair of files) that --skip-bad may skip."""


class OutputStateError(NamedMaskError, RuntimeError):
    """An output folder or run state the command cannot use; the message names the path."""


class UnavailableError(NamedMaskError, RuntimeError):
    """Weights, a device, a backend or a package that is not there; the message says how to get it."""


KINDS = (BadInputError, SkippableItemError, OutputStateError, UnavailableError)


class InputError(BadInputError):
    """Bad input found by a module with no error class of its own."""
