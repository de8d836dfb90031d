"""``GET /v1/models``: the base model and the adapters this key may use."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from server.app.deps import AUTH, Owner, StateDep

router = APIRouter(tags=["models"], dependencies=AUTH)


@router.get("/v1/models")
async def list_models(state: StateDep, key_id: Owner):
    data = [{"id": state.settings.served_name, "object": "model", "created": int(state.started),
             "owned_by": "dynarank"}]
    if state.adapters is not None:
        data += await asyncio.to_thread(state.adapters.list_for, key_id)
    return {"object": "list", "data": data}
