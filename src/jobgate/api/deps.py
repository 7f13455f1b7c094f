"""FastAPI dependencies as `Annotated` aliases: `StateDep`, `CurrentPrincipal`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from jobgate.api.state import AppState
from jobgate.auth import Principal
from jobgate.auth.api_keys import authenticate_request


def get_state_of(request: Request) -> AppState:
    """The app's state, for code that takes the request rather than dependencies."""
    state: AppState = request.app.state.jobgate
    return state


async def get_state(request: Request) -> AppState:
    # async: FastAPI runs a plain `def` dependency in a worker thread, per request.
    return get_state_of(request)


StateDep = Annotated[AppState, Depends(get_state)]


async def current_principal(request: Request, state: StateDep) -> Principal:
    """The authenticated caller, or `Unauthenticated` (401)."""
    principal = await authenticate_request(request, state)
    request.state.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
