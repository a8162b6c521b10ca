"""The settings object: the shared sections (:mod:`sdfsmis.config`) and one section per method
of the registry, read from a YAML preset.

Presets ship inside the package (``sdfsmis/presets``, so an installed wheel finds them; the
checkout's ``configs/`` links to the same files). Defaults are the paper's settings (``sd15``).
A backbone directory may carry its own ``sdfsmis.yaml`` (``sdfsmis make-tiny`` writes one), so
that a tiny backbone is always run at the resolution it was built for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdfsmis.config import InferenceConfig, TrainingConfig, merge_section
from sdfsmis.io.backbone import BACKBONE_PRESET_FILE
from sdfsmis.methods import METHODS

PRESET_DIR = Path(__file__).resolve().parent / "presets"
METHOD_SECTIONS = {method.settings_key: method.settings_class for method in METHODS.values()}


@dataclass
class Settings:
    """Shared sections as fields; each method's section (``model``, ``dpl``, ...) as an attribute
    of the same name, kept in ``methods``."""

    inference: InferenceConfig = field(default_factory=InferenceConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    methods: dict[str, Any] = field(default_factory=lambda: {key: kind() for key, kind in METHOD_SECTIONS.items()})
    tiny_backbone: dict[str, Any] = field(default_factory=dict)
    sd15_backbone: dict[str, Any] = field(default_factory=dict)  # architecture only, for benchmarks

    def __getattr__(self, name: str) -> Any:
        methods = self.__dict__.get("methods", {})
        if name in methods:
            return methods[name]
        raise AttributeError(f"{type(self).__name__} has no section {name!r}")

    @property
    def resolution(self) -> int:
        """The slice size every method runs at; kept under ``model.resolution`` in the presets."""
        return self.methods["model"].resolution

    def to_dict(self) -> dict[str, Any]:
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "methods"}
        sections = {key: dataclasses.asdict(section) for key, section in self.methods.items()}
        return {**sections, **{key: _plain(value) for key, value in shared.items()}}

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def config_from_dict(values: dict[str, Any]) -> Settings:
    settings = Settings()
    for key, section in (values or {}).items():
        if key in METHOD_SECTIONS:
            merge_section(settings.methods[key], section or {}, f"config.{key}")
        elif key in {f.name for f in dataclasses.fields(Settings)} and key != "methods":
            current = getattr(settings, key)
            if dataclasses.is_dataclass(current):
                merge_section(current, section or {}, f"config.{key}")
            else:
                setattr(settings, key, section)
        else:
            known = [*METHOD_SECTIONS, *(f.name for f in dataclasses.fields(Settings) if f.name != "methods")]
            raise ValueError(f"unknown setting config.{key} (known: {', '.join(known)})")
    return settings


def load_config(preset: str | Path | None = None, backbone: str | Path | None = None) -> Settings:
    """Resolve settings: an explicit preset (a name in the package's presets or a YAML path)
    wins, then the backbone directory's own ``sdfsmis.yaml``, then the paper defaults."""
    path: Path | None = None
    if preset:
        candidate = Path(preset)
        path = candidate if candidate.suffix in (".yaml", ".yml") else PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
            raise FileNotFoundError(f"config preset not found: {path} (presets: {known}, or a YAML path)")
    elif backbone and (Path(backbone) / BACKBONE_PRESET_FILE).is_file():
        path = Path(backbone) / BACKBONE_PRESET_FILE
    if path is None:
        return Settings()
    return config_from_dict(yaml.safe_load(path.read_text()) or {})
