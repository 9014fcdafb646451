"""The package version, in a module of its own so that inner layers can read it without importing the library."""

__version__ = "0.1.0"
