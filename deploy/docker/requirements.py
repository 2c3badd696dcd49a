"""Print the requirements of tusk's base dependencies plus the given extras, one a line, read from
pyproject.toml alone. The Dockerfiles install these in a layer of their own before they copy the
sources, so a source change rebuilds only the small ``pip install --no-deps .`` layer after it.

Usage: python3 requirements.py EXTRA... > requirements.txt   (run where pyproject.toml is)
"""

from __future__ import annotations

import sys
import tomllib


def requirements(project: dict, extras: list[str]) -> list[str]:
    optional = project.get("optional-dependencies", {})
    out = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"requirements.py: pyproject.toml has no extra {extra!r}")
        for req in optional[extra]:
            if req.split("[", 1)[0].strip().lower() == project["name"]:
                raise SystemExit(
                    f"requirements.py: extra {extra!r} refers to {project['name']} itself: {req}"
                )
            out.append(req)
    return out


if __name__ == "__main__":
    with open("pyproject.toml", "rb") as f:
        print("\n".join(requirements(tomllib.load(f)["project"], sys.argv[1:])))
