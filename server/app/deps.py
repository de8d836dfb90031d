"""FastAPI dependencies as ``Annotated`` aliases; tests swap them with ``app.dependency_overrides``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from server.app.auth import require_api_key
from server.app.errors import APIError
from server.app.state import ServerState, Services
from server.config import Settings
from server.engines.base import Engine
from server.engines.bridge import GenerationBridge


def get_state(conn: HTTPConnection) -> ServerState:
    return conn.app.state.dynarank


StateDep = Annotated[ServerState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]

# The caller's key identity (None when auth is off). Routers also list it as a
# router-level dependency; FastAPI runs it once per request either way.
Owner = Annotated[str | None, Depends(require_api_key)]


def _no_model() -> APIError:
    return APIError(503, "No model is loaded.", code="model_not_loaded")


def get_engine(state: StateDep) -> Engine:
    if state.engine is None:
        raise _no_model()
    return state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def get_bridge(state: StateDep) -> GenerationBridge:
    if state.bridge is None:
        raise _no_model()
    return state.bridge


BridgeDep = Annotated[GenerationBridge, Depends(get_bridge)]


def get_services(state: StateDep) -> Services:
    if state.services is None:
        raise _no_model()
    return state.services


ServicesDep = Annotated[Services, Depends(get_services)]

AUTH = [Depends(require_api_key)]  # router-level auth: APIRouter(dependencies=AUTH)
