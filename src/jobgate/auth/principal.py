"""`Principal`: an authenticated caller and what its roles allow."""

from __future__ import annotations

from dataclasses import dataclass

from jobgate.errors import Forbidden

ROLES = ("admin", "user", "viewer")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    Attributes:
        id: the user id (a JWT's `sub`, an API key's owner).
        roles: `admin` (everything, every owner), `user` (own jobs), `viewer` (read own).
        key_id: the API key used, if one was.
    """

    id: str
    roles: frozenset[str]
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def can_write(self) -> bool:
        return bool(self.roles & {"admin", "user"})

    def owner_filter(self) -> str | None:
        """The owner every query must be limited to: None for admins (they see all)."""
        return None if self.is_admin else self.id

    def require_write(self) -> None:
        """Raise `Forbidden` unless the caller may submit and change jobs."""
        if not self.can_write:
            raise Forbidden("this needs the 'user' or 'admin' role")

    def require_admin(self) -> None:
        """Raise `Forbidden` unless the caller is an admin."""
        if not self.is_admin:
            raise Forbidden("this needs the 'admin' role")
