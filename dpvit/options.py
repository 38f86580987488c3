"""Config fields that carry their own command-line help, flag name and allowed values.

``ViTConfig`` (dpvit.vit) and ``TrainConfig`` (dpvit.config) declare every field with
`option`; dpvit.config turns the fields into flags and TOML keys, so a setting is described
once, next to its default.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str, flag: str | None = None, choices: tuple | None = None):
    """A dataclass field with its help text, optional short flag name and allowed values."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})
