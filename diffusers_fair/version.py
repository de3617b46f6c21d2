"""The version of diffusers-fair."""

__version__ = "0.1.0"
