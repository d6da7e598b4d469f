"""One base class for every error a user can act on (a bad file, option or config value).

The CLI catches `NamedMaskError` in one place and prints its message as one line (a traceback
only with -vv); library callers can catch it to tell "fix your input" from a bug. Each
subclass also keeps the builtin base it had before (ValueError, RuntimeError, ...), so code
that caught those still works."""
from __future__ import annotations


class NamedMaskError(Exception):
    """An error whose message says what is wrong with the input and what to do."""
