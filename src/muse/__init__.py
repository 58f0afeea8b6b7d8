"""Muse: an open, hackable stack for building your own language-model family."""

__version__ = "0.1.0"
