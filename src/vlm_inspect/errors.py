"""Errors the library raises; the CLI turns them into a message and a non-zero exit."""

from __future__ import annotations


class VlmInspectError(Exception):
    """Base of every error meant for the user: its text says what is wrong and where."""


class ConfigError(VlmInspectError):
    """One or more settings are wrong; lists every problem at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = "1 problem with the settings:" if n == 1 else f"{n} problems with the settings:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class ModelFolderError(VlmInspectError):
    """A model folder is missing, incomplete or of the wrong layout."""


class DataError(VlmInspectError):
    """Input photos, folders or dataset files are missing or malformed."""


class OutputExistsError(VlmInspectError):
    """An output folder or file exists and overwriting was not asked for."""


class StationError(VlmInspectError):
    """The station store (its folder or database) cannot be opened, read or written."""
