"""cbam-ablate: measured ablations of CBAM and its proposed improvements."""

from . import resolvers  # noqa: F401  registers the resolvers the model configs use, for whoever composes them
