"""Errors of the dream package: each names what was wrong and how to fix it (tools show them as-is)."""


class DreamError(ValueError):
    """A dream-loop, invariant or certificate request that cannot be carried out as given."""


class InvalidInvariant(DreamError):
    """An invariant file, spec or judge configuration that cannot be stored or built.

    The message starts with the field path (``cases[3].preferred: ...``) and says how to fix it;
    whatever raised it stored nothing.
    """


class UnknownInvariant(InvalidInvariant, KeyError):
    """No active invariant has that name (a KeyError too, for lookups)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
