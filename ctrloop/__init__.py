"""ctrloop: online-learning CTR/CVR for ads (README.md)."""

from importlib.metadata import PackageNotFoundError, version

try:
    # The one version is pyproject.toml's; the installed metadata carries it (the OpenAPI
    # document and `ctrloop --version` read this), so it is never written twice.
    __version__: str = version("ctrloop")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
