"""snet: a social network back end built as a Twisted service stack."""

__version__ = "0.1.0"
