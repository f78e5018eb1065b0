"""The one version source of flatkern (pyproject.toml reads it)."""

__version__ = "0.1.0"
