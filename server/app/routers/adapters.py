"""``/v1/adapters``: list, download (PEFT tar.gz) and delete stored and session adapters."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from server.app.deps import AUTH, Owner, ServicesDep, SettingsDep
from server.app.errors import APIError
from server.store import SESSION_PREFIX, StoreError, check_name

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], dependencies=AUTH)


def _checked(name: str) -> str:
    try:
        return check_name(name)
    except StoreError as exc:
        raise APIError(400, str(exc), code="invalid_adapter_name", param="name") from None


def _not_found(name: str, version: int | None = None) -> APIError:
    return APIError(404, f"no adapter {name}" + (f" version {version}" if version else ""),
                    code="adapter_not_found", param="name")


@router.get("")
def list_adapters(services: ServicesDep, settings: SettingsDep, owner: Owner):
    base = settings.served_name
    rows = {r["name"]: {**r, "model": f"{base}:{r['name']}"} for r in services.store.list(owner)}
    for s in services.sessions.sessions(owner):
        row = rows.setdefault(s.adapter_name, {"name": s.adapter_name, "kind": "session", "versions": [],
                                               "repository": s.repository, "model": f"{base}:{s.adapter_name}"})
        row["live_version"] = s.current().version
    return {"object": "list", "data": sorted(rows.values(), key=lambda r: r["name"])}


@router.delete("/{name}")
def delete_adapter(name: str, services: ServicesDep, owner: Owner):
    _checked(name)
    if name.startswith(SESSION_PREFIX):
        deleted = services.sessions.delete_session(owner, name[len(SESSION_PREFIX):])
    else:
        deleted = services.store.delete(owner, name)
    if not deleted:
        raise _not_found(name)
    return {"id": name, "object": "adapter", "deleted": True}


@router.get("/{name}/download")
def download_adapter(name: str, services: ServicesDep, owner: Owner, version: int | None = None):
    _checked(name)
    session = services.sessions.get(owner, name[len(SESSION_PREFIX):]) if name.startswith(SESSION_PREFIX) else None
    if session is not None:  # export what serving uses now (written first, even if it never trained)
        services.sessions.persist(session, force=True)
    try:
        data = services.store.export_tar(owner, name, version)
    except KeyError:
        raise _not_found(name, version) from None
    return Response(data, media_type="application/gzip",
                    headers={"Content-Disposition": f'attachment; filename="{name}.tar.gz"'})
