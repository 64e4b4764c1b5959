"""Ships the Hydra configs (``conf/``) inside the wheel as ``ood_bench/conf`` (package data), so that the Python API
(``ood_bench.evaluate``) finds them when the package is installed without its source checkout. Everything else is
declared in pyproject.toml."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithConf(build_py):
    """``build_py`` plus a copy of ``conf/`` (a user's private ``conf/local/*.yaml`` left out)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the checkout's conf/ directly
            return
        target = Path(self.build_lib) / "ood_bench" / "conf"
        if target.exists():
            shutil.rmtree(target)
        for src in sorted((ROOT / "conf").rglob("*")):
            rel = src.relative_to(ROOT / "conf")
            if src.is_dir() or (rel.parts[0] == "local" and src.suffix == ".yaml"):
                continue
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target / rel)


setup(cmdclass={"build_py": BuildPyWithConf})
