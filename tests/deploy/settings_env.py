"""What a deployment file may set: ``RIVERFLOW_*`` names of ``riverflow.settings.Settings``."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import SecretStr

from riverflow.settings import Settings

PREFIX = "RIVERFLOW_"
SETTINGS_ENV = {f"{PREFIX}{name.upper()}" for name in Settings.model_fields}
# the settings that are secrets (SecretStr): a Kubernetes Secret's, never a ConfigMap's
SECRET_ENV = {
    f"{PREFIX}{name.upper()}"
    for name, field in Settings.model_fields.items()
    if SecretStr in getattr(field.annotation, "__args__", (field.annotation,))
}


def unknown_names(names: set[str]) -> set[str]:
    """The names that no setting reads (a typo, or a setting since renamed)."""
    return names - SETTINGS_ENV


def settings_from_env(env: Mapping[str, object]) -> Settings:
    """The settings a stage would read from ``env`` (and nothing else of the process's)."""
    return Settings.model_validate({k.removeprefix(PREFIX).lower(): str(v) for k, v in env.items()})
