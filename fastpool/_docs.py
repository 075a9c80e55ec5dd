"""Docstring assembly shared by the public modules.

Under ``python -OO`` (or ``PYTHONOPTIMIZE=2``) every ``__doc__`` is ``None``; the
helpers here then leave it alone, so nothing at import time depends on docstrings.
"""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])

MARKER = "    Shape-section\n"


def _probe():
    """Present unless docstrings are stripped."""


# Whether this interpreter keeps docstrings (False under -OO / PYTHONOPTIMIZE=2):
# docstrings built from templates are then left out too.
DOCSTRINGS = _probe.__doc__ is not None


def with_section(text: str, marker: str = MARKER) -> Callable[[F], F]:
    """Decorator: replace ``marker`` in the function's docstring by ``text``."""
    def decorate(function: F) -> F:
        if function.__doc__ is not None:
            function.__doc__ = function.__doc__.replace(marker, text)
        return function
    return decorate
