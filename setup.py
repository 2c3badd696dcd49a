"""Build hook: generate the gRPC code before packaging (configuration is in pyproject.toml)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

_BUILD_SCRIPT = Path(__file__).resolve().parent / "tusk" / "protocol" / "build.py"


class BuildWithProtocol(build_py):
    def run(self) -> None:
        # Loaded by path so that building does not import the tusk package itself.
        spec = importlib.util.spec_from_file_location("tusk_protocol_build", _BUILD_SCRIPT)
        protocol_build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(protocol_build)
        if not protocol_build.is_current():
            protocol_build.generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProtocol})
