"""Files that ship inside the package: configs, the sample model and the sample scene.

They resolve through `importlib.resources`, so they are found from an installed wheel as from the
checkout, whatever the working directory. A path the user gives always wins over a bundled name.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CONFIGS_PACKAGE = "querydet_cli.configs"
SAMPLE_PACKAGE = "querydet_cli.sample_data"


def _bundled(package: str, name: str) -> Path:
    """The real file path of a bundled file (installed wheels and editable installs alike)."""
    return Path(str(resources.files(package).joinpath(name)))


def sample_model() -> Path:
    """The bundled QueryDet MobileNetV2 model trained on synthetic scenes."""
    return _bundled(SAMPLE_PACKAGE, "sample_model.pt")


def sample_scene() -> Path:
    """The bundled 2048x2048 synthetic GeoTIFF."""
    return _bundled(SAMPLE_PACKAGE, "sample_scene.tif")


def config_path(name: str) -> Path:
    """The bundled config called `name` (without .yaml)."""
    return _bundled(CONFIGS_PACKAGE, f"{name}.yaml")


def config_names() -> list[str]:
    """Names of the bundled configs, sorted."""
    root = resources.files(CONFIGS_PACKAGE)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))
