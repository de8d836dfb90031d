"""``POST /v1/completions/{id}/feedback``: what the user did with a completion."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from server.app.deps import AUTH, Owner, ServicesDep
from server.errors import ClientError

router = APIRouter(tags=["feedback"], dependencies=AUTH)


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event: str
    accepted_text: str | None = None
    index: int = Field(0, ge=0)  # choice index, for requests with several prompts or n > 1


@router.post("/v1/completions/{completion_id}/feedback")
def feedback(completion_id: str, body: FeedbackBody, services: ServicesDep, owner: Owner):
    cid = completion_id if body.index == 0 else f"{completion_id}.{body.index}"
    try:
        return services.feedback.apply(owner, cid, body.event, body.accepted_text)
    except ClientError as exc:
        exc.param = "completion_id"
        raise
