"""The device classes a controller watches: budgets and power models, read once at start.

`homefleet controller serve --device-classes DIR` loads every ``*.yaml`` in DIR (the same
files `homefleet compress --device-class` takes, e.g. ``deploy/device-classes/``). The
budget loop checks each class's observed telemetry against these budgets, and a
recompression starts from the class as declared here. Every replica reads the same
directory (a ConfigMap on Kubernetes), so no replica holds the only copy. A bad file
stops the controller at start with the file and field named; nothing is half-loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from controller.device_classes import DeviceClass, DeviceClassError, load_device_class


@dataclass(frozen=True)
class DeviceClassRegistry:
    """Device classes by name; empty when the controller was started without a directory."""

    classes: Mapping[str, DeviceClass] = field(default_factory=lambda: MappingProxyType({}))
    source: Path | None = None

    @classmethod
    def load(cls, directory: Path) -> DeviceClassRegistry:
        """Every ``*.yaml`` in ``directory``, validated; two files naming one class are refused."""
        if not directory.is_dir():
            raise DeviceClassError(
                f"--device-classes {directory} is not a directory; point it at a directory of "
                "device-class YAML files such as deploy/device-classes/"
            )
        found: dict[str, DeviceClass] = {}
        origin: dict[str, Path] = {}
        for path in sorted(directory.glob("*.yaml")):
            device_class = load_device_class(path)
            if device_class.name in found:
                raise DeviceClassError(
                    f"{path} and {origin[device_class.name]} both declare device class "
                    f"{device_class.name!r}; each class must be declared once"
                )
            found[device_class.name] = device_class
            origin[device_class.name] = path
        if not found:
            raise DeviceClassError(
                f"--device-classes {directory} holds no *.yaml device class files"
            )
        return cls(MappingProxyType(found), directory)

    def get(self, name: str) -> DeviceClass | None:
        return self.classes.get(name)

    def names(self) -> list[str]:
        return sorted(self.classes)
