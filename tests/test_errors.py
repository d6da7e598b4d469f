"""Four kinds of user error (namedmask/errors.py): every error class of the package derives from
exactly one kind and keeps its builtin base, so `except ValueError` callers keep working."""
import importlib
import inspect
import pkgutil

import pytest

import namedmask
from namedmask.errors import KINDS, BadInputError, NamedMaskError, SkippableItemError


def _error_classes() -> dict:
    found = {}
    for info in pkgutil.walk_packages(namedmask.__path__, "namedmask."):
        if info.name.startswith(("namedmask.kernels", "namedmask._C")) or info.name == "namedmask.__main__":
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional dependency (DALI, pydensecrf2, ...) not installed here
            continue
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, NamedMaskError) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


ERRORS = _error_classes()


def test_the_package_has_error_classes():
    assert len(ERRORS) >= 20, sorted(ERRORS)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_every_error_is_of_exactly_one_kind(name):
    cls = ERRORS[name]
    if cls in KINDS or cls is NamedMaskError:
        return
    kinds = {k for k in KINDS if issubclass(cls, k)}
    if SkippableItemError in kinds:
        kinds.discard(BadInputError)  # a skippable item is a kind of bad input
    assert len(kinds) == 1, (name, kinds)
    assert issubclass(cls, (ValueError, RuntimeError, OSError))   # a builtin base, for older callers
