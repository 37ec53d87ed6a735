"""``bundles.yaml``: which bundles exist, where they live, their config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdcube.config import ExecMode

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_MODULE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
_EXAMPLES_DEFAULT = "echo"
# Where KDCube's bundles.yaml files keep a bundle's own executor choice.
_EXEC_MODE_PATH = ("execution", "runtime", "mode")


class RegistryError(ValueError):
    """The registry file cannot be used; the message says where and why."""


class BundleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=_ID_PATTERN)
    name: str | None = None
    path: Path | None = None
    module: str = Field("entrypoint", pattern=_MODULE_PATTERN)
    repo: str | None = None
    ref: str | None = None
    subdir: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> BundleSpec:
        if (self.path is None) == (self.repo is None):
            raise ValueError("give either path (a mounted folder) or repo (git)")
        self._check_exec_mode()
        return self

    @property
    def exec_mode(self) -> ExecMode | None:
        """The executor this bundle asks for in ``config.execution.runtime.mode``;
        None leaves the choice to the deployment (``KDCUBE_EXEC``)."""
        value: Any = self.config
        for name in _EXEC_MODE_PATH:
            if not isinstance(value, dict):
                return None
            value = value.get(name)
        return value  # type: ignore[no-any-return]

    def _check_exec_mode(self) -> None:
        mode = self.exec_mode
        if mode is not None and mode not in get_args(ExecMode):
            raise ValueError(
                f"config.execution.runtime.mode {mode!r} is not one of"
                f" {', '.join(get_args(ExecMode))}"
            )


class _Bundles(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_bundle_id: str | None = None
    items: list[BundleSpec]

    @model_validator(mode="after")
    def _consistent(self) -> _Bundles:
        ids = [item.id for item in self.items]
        if not ids:
            raise ValueError("items must list at least one bundle")
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"bundle ids must be unique: {', '.join(duplicates)}")
        if self.default_bundle_id is not None and self.default_bundle_id not in ids:
            raise ValueError(
                f"default_bundle_id {self.default_bundle_id!r} is not in items"
            )
        return self


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundles: _Bundles


class BundleRegistry:
    """The validated registry: bundle specs by id, and the default one."""

    def __init__(self, specs: list[BundleSpec], default_id: str) -> None:
        self.specs = {spec.id: spec for spec in specs}
        self.default_id = default_id

    def resolve(self, bundle_id: str | None) -> BundleSpec | None:
        return self.specs.get(bundle_id or self.default_id)

    def document(self) -> dict[str, Any]:
        """The registry as a bundles.yaml document (paths made absolute)."""
        items = [
            spec.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
            for spec in self.specs.values()
        ]
        return {"bundles": {"default_bundle_id": self.default_id, "items": items}}


def parse_registry(document: Any, *, base: Path) -> BundleRegistry:
    """Validate a parsed bundles document; relative paths resolve from ``base``."""
    try:
        parsed = _File.model_validate(document).bundles
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise RegistryError(f"{where}: {first['msg']}") from None

    specs = []
    for spec in parsed.items:
        if spec.repo is not None:
            # Fetched by each processor when it loads the registry.
            specs.append(spec)
            continue
        assert spec.path is not None
        folder = spec.path if spec.path.is_absolute() else base / spec.path
        if not folder.is_dir():
            raise RegistryError(
                f"bundle {spec.id!r}: path {str(folder)!r} is not a folder"
            )
        specs.append(spec.model_copy(update={"path": folder.resolve()}))

    return BundleRegistry(specs, parsed.default_bundle_id or specs[0].id)


def read_registry(path: Path) -> BundleRegistry:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise RegistryError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path} is not valid YAML: {exc}") from None
    try:
        return parse_registry(document, base=path.parent)
    except RegistryError as exc:
        raise RegistryError(f"{path}: {exc}") from None


def examples_root() -> Path:
    """The example bundles shipped with kdcube (``bundles/`` of the source tree)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "examples", package.parent.parent / "bundles"):
        if candidate.is_dir():
            return candidate
    raise RegistryError("no example bundles found; pass --bundles FILE")


def default_registry() -> BundleRegistry:
    """Every example bundle, with ``echo`` as the default."""
    root = examples_root()
    specs = [
        BundleSpec(id=folder.name, path=folder, module="entrypoint")
        for folder in sorted(root.iterdir())
        if (folder / "entrypoint.py").is_file()
    ]
    if not specs:
        raise RegistryError(f"no bundles under {root}")
    ids = [spec.id for spec in specs]
    default = _EXAMPLES_DEFAULT if _EXAMPLES_DEFAULT in ids else ids[0]
    return BundleRegistry(specs, default)
