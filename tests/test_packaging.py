"""Configs, weights, model card and templates are package data (DESIGN.md "Layout": ``pip install .``
works as well as an editable install).

Cheap checks of what a wheel needs, without building one: the code finds its data files through
the installed packages (``importlib.resources`` / the module's own folder), never relative to the
repository root, and the ``[tool.setuptools.package-data]`` globs of pyproject.toml match the
files that exist and cover every data file of the packages. (Built and installed by hand into a
throw-away venv for issue 17: README changelog.)
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = ("pipeline", "models", "flows", "configs", "phantom")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def _package_dir(package: str) -> Path:
    return ROOT.joinpath(*package.split("."))


def test_the_configs_are_read_from_the_configs_package():
    from pipeline.core import config
    from pipeline.ingest import role_rules

    configs_dir = Path(str(files("configs"))).resolve()
    assert (configs_dir / "__init__.py").is_file()  # a regular package, not a namespace
    assert config.CONFIG_DIR == configs_dir
    assert config.DEFAULT_CONFIG_PATH == configs_dir / "default.yaml" and config.DEFAULT_CONFIG_PATH.is_file()
    assert role_rules.DEFAULT_ROLE_RULES == configs_dir / "series_roles.yaml"
    assert role_rules.DEFAULT_ROLE_RULES.is_file()
    cfg = config.load_config()
    assert role_rules.resolve_rules_path(cfg.ingest.series_roles_file) == configs_dir / "series_roles.yaml"


def test_the_default_weights_are_found_inside_the_models_package(tmp_path):
    from models.infer import resolve_weights
    from pipeline.core.config import load_config

    weights = resolve_weights(load_config().segmentation.network_weights)
    models_dir = Path(str(files("models"))).resolve()
    assert weights.is_file()
    assert weights.parent == models_dir / "weights"  # in the package, so installed with it
    assert resolve_weights(tmp_path / "mine.pt") == tmp_path / "mine.pt"  # an absolute path stays


def test_no_product_module_reads_files_from_the_repository_root():
    # A path built from __file__ up past the module's own package points at the repository root,
    # which an installed wheel does not have (site-packages instead).
    pattern = re.compile(r"__file__.*(\.parent\.parent|\.parents\[)")
    offenders = []
    for package in PACKAGE_ROOTS:
        for path in sorted((ROOT / package).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "paths relative to the repository root:\n" + "\n".join(offenders)


def test_package_data_globs_match_existing_files_of_packaged_packages():
    setuptools = _setuptools()
    include = setuptools["packages"]["find"]["include"]
    package_data = setuptools["package-data"]
    assert "*" not in package_data, "name the package of each data file (a '*' entry hides a missing one)"
    for package, globs in package_data.items():
        folder = _package_dir(package)
        assert (folder / "__init__.py").is_file(), f"package-data names {package}, which is not a package"
        assert any(fnmatch.fnmatch(package, pattern) for pattern in include), f"{package} not in packages.find"
        for glob in globs:
            assert list(folder.glob(glob)), f"package-data glob {package}: {glob} matches no file"


def test_every_data_file_of_the_packages_is_package_data():
    package_data = _setuptools()["package-data"]
    covered = {path.resolve() for package, globs in package_data.items()
               for glob in globs for path in _package_dir(package).glob(glob)}
    missing = [str(path.relative_to(ROOT)) for package in PACKAGE_ROOTS for path in sorted((ROOT / package).rglob("*"))
               if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
               and path.resolve() not in covered]
    assert not missing, "data files a wheel would leave out (add them to package-data):\n" + "\n".join(missing)
    for needed in ("configs/default.yaml", "configs/series_roles.yaml", "models/README.md",
                   "models/weights/segresnet_synthetic.pt", "pipeline/outputs/templates/patient_report.html.j2"):
        assert (ROOT / needed).resolve() in covered, needed
