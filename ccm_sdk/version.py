"""The SDK's version, apart from the package so that its own modules can read it without importing the package."""

__version__ = "0.1.0"
