"""Configuration files, read strictly: the one base of every config schema (a model's
``config.yaml``, an experiment, an integrity block) and the one way their errors are said.

Unknown keys are an error naming the key and the file: a typo such as ``max_batch_sise`` must
not silently fall back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

__all__ = ["StrictModel", "format_validation_error"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Optional fields that came after experiments had been run: left out of the canonical dump
    # while at their default, so the config hashes (and the cached stages) of experiments that
    # do not use them stay what they were.
    _added_later: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unset_later_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        out: dict[str, object] = handler(self)
        for name in self._added_later:
            if getattr(self, name) == type(self).model_fields[name].default:
                out.pop(name, None)
        return out


def format_validation_error(exc: ValidationError, path: Path | str, root: str = "config") -> str:
    """One line naming the file and every problem; an unknown key is named as such."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        else:
            parts.append(f"{loc or root}: {err['msg']}")
    return f"{path}: " + "; ".join(parts)
