"""tusk: a Kubernetes-native control plane for distributed LLM serving.

The components live in top-level folders of the source tree (``operator/``, ``router/``,
``worker/``, ``kernels/``) and are installed as ``tusk.operator`` and friends. The folder
``operator/`` deliberately has no ``__init__.py``: a regular package of that name would shadow
the standard library's ``operator`` for anything run from the checkout root. In a source checkout
the root is appended to this package's search path so the component folders resolve as
``tusk.<component>``; installed wheels carry them inside ``tusk/`` and need no help.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "operator").is_dir():
    __path__.append(str(_checkout))  # noqa: F821 - a package's __path__ is module-global
