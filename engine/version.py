"""The package's version, in a module of its own so every layer can name it without the facade."""

__version__ = "0.1.0"
