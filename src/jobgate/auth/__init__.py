"""Who is calling: API keys and JWTs, and what their roles allow."""

from jobgate.auth.principal import ROLES, Principal

__all__ = ["ROLES", "Principal"]
