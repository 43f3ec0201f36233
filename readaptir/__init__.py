"""readaptir: reverse-engineered adaptation of dense retrievers, as content-addressed DVC stages."""

__version__ = "0.1.0"
