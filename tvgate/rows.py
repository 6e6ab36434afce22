"""View dataclasses from database rows and back to JSON: the one place that copies a row's
columns into a dataclass by field name, and a dataclass's fields into a dict.

Services, the router and the governor each keep read-only views of rows (what may be shown
of a key, what the proxy needs of a route); a view names its fields, and these helpers
fill and show them, so a field added to a view is a field copied and shown.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

View = TypeVar("View", bound="DataclassInstance")


def fields_of(view: DataclassInstance, **shown: Any) -> dict[str, Any]:
    """A view dataclass as its JSON: every field, by name, in order; ``shown`` gives the
    fields whose JSON is not the value itself (a tuple as a list, a masked fingerprint)."""
    return {f.name: getattr(view, f.name) for f in dataclasses.fields(view)} | shown


def from_row(view: type[View], row: Any, **given: Any) -> View:
    """A view dataclass of a row: each field is the row's attribute of that name, but for
    those in ``given`` (the ones the row holds otherwise: a user's email for its id)."""
    return view(
        **{f.name: getattr(row, f.name) for f in dataclasses.fields(view) if f.name not in given},
        **given,
    )
