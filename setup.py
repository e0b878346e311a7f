"""Map drivers/ and simulators/ into the clemflow namespace.

The design card keeps instrument drivers and simulators at the top level of the
repository, beside src/. setuptools cannot express "find sub-packages of a
renamed directory" in pyproject.toml alone, so the package list is computed here.
"""

from setuptools import find_packages, setup

PACKAGE_DIRS = {"clemflow": "src/clemflow", "clemflow.drivers": "drivers", "clemflow.simulators": "simulators"}


def _packages() -> list[str]:
    found = []
    for name, path in PACKAGE_DIRS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(path)]
    return found


setup(
    packages=_packages(),
    package_dir=PACKAGE_DIRS,
    package_data={"clemflow.simulators.confocal": ["*.cfg"]},
    include_package_data=True,
)
