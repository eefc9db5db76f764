"""The base of the settings.yml sections (site/settings.py, site/transfers/config.py):
pydantic models that check types strictly (no "yes" for true, no "3" for 3), refuse
unknown keys, and reject NaN and infinities. An empty YAML value (`key:`) means the
key's default; numbers given where text is expected are taken as text (`queue: 123`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator


def _as_text(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


# A string field that also takes a YAML number as its text.
Text = Annotated[str, BeforeValidator(_as_text)]


class Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _empty_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data
