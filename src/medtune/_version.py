"""The package version: one home, imported by the records, the report and the CLI."""

__version__ = "0.1.0"
