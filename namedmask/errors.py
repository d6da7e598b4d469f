"""One base class for every error a user can act on (a bad file, option or config value).

The CLI catches `NamedMaskError` in one place and prints its message as one line (a traceback
only with -vv); library callers can catch it to tell "fix your input" from a bug. Each
subclass also keeps the builtin base it had before (ValueError, RuntimeError, ...), so code
that caught those still works."""
from __future__ import annotations


class NamedMaskError(Exception):
    """An error whose message says what is wrong with the input and what to do."""


class InputError(NamedMaskError, ValueError):
    """A bad option, config value or user file (a category list, a template file, a model name)
    found by a module with no error class of its own; the message names it and what to do."""
