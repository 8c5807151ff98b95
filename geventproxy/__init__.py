"""geventproxy: a transparent, observable proxy for the Foo line protocol."""

__version__ = "0.1.0"
