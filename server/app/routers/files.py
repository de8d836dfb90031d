"""``/v1/files``: training files for fine-tuning jobs, in OpenAI's file shape.

An upload is multipart (``file``, ``purpose="fine-tune"``), checked line by
line before it is stored (``server/adaptation/training_file.py``), and belongs
to the API key that sent it. Its size is bounded by the request body limit
(``--max-request-bytes``): a larger upload is answered 413 before it is read.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from server.adaptation.training_file import TrainingFileError, parse
from server.app.deps import AUTH, Owner, ServicesDep
from server.app.errors import APIError

router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=AUTH)

PURPOSE = "fine-tune"  # the only use this server has for files


def _not_found(file_id: str) -> APIError:
    return APIError(404, f"no file {file_id}", code="file_not_found", param="file_id")


@router.post("")
async def upload_file(services: ServicesDep, owner: Owner, file: Annotated[UploadFile, File()],
                      purpose: Annotated[str, Form()]):
    if purpose != PURPOSE:
        raise APIError(400, f"purpose must be {PURPOSE!r}: this server keeps files for fine-tuning only",
                       code="invalid_purpose", param="purpose")
    data = await file.read()
    try:
        await asyncio.to_thread(parse, data)
    except TrainingFileError as exc:
        raise APIError(400, f"{file.filename or 'file'}: {exc}", code="invalid_file", param="file") from None
    return await asyncio.to_thread(services.files.add, owner, file.filename or "upload.jsonl", purpose, data)


@router.get("")
def list_files(services: ServicesDep, owner: Owner, purpose: str | None = None):
    return {"object": "list", "data": services.files.list(owner, purpose), "has_more": False}


@router.get("/{file_id}")
def get_file(file_id: str, services: ServicesDep, owner: Owner):
    try:
        return services.files.get(owner, file_id)
    except KeyError:
        raise _not_found(file_id) from None


@router.delete("/{file_id}")
def delete_file(file_id: str, services: ServicesDep, owner: Owner):
    try:
        return services.files.delete(owner, file_id)
    except KeyError:
        raise _not_found(file_id) from None
