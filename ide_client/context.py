"""What every CLI command shares: server, API key, and the saved session.

A saved resume token that the server no longer accepts (its data directory was
wiped) is forgotten and a fresh session started, with a note, instead of
failing every command until the user deletes the state file by hand. A session
named on the command line (``--session``, ``--resume``) must exist: a typo
should be an error, not a new empty session under the mistyped name.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ide_client.http_api import API, AsyncAPI
from ide_client.session import AsyncSession, ProtocolError
from ide_client.state import StateFile, default_state_path
from ide_client.urls import http_base

STALE_CODES = {"invalid_resume_token", "session_not_found"}


@dataclass
class Context:
    server: str
    api_key: str | None = None
    session_id: str | None = None
    resume_token: str | None = None
    new_session: bool = False
    state_path: Path | None = None
    repo_root: Path | None = None
    err: object = field(default=sys.stderr)

    def __post_init__(self):
        self.server = http_base(self.server)
        self.state = StateFile(self.state_path or default_state_path(self.repo_root))

    def saved(self) -> dict:
        return {} if self.new_session else self.state.load(self.server)

    def credentials(self) -> tuple[str | None, str | None]:
        """(session_id, resume_token) to send in hello."""
        saved = self.saved()
        if self.session_id and self.session_id != saved.get("session_id"):
            return self.session_id, self.resume_token  # a different session than the saved one
        return (self.session_id or saved.get("session_id"), self.resume_token or saved.get("resume_token"))

    def session(self, repository: dict | None = None, **kwargs) -> AsyncSession:
        sid, token = self.credentials()
        return AsyncSession(self.server, api_key=self.api_key, session_id=sid, resume_token=token,
                            repository=repository, **kwargs)

    async def connect(self, session: AsyncSession):
        if self.session_id and not session.resume_token:
            # Joining by id alone would start a new session under that id; ask first (404 if unknown).
            async with AsyncAPI(self.server, self.api_key) as api:
                await api.session(self.session_id)
        try:
            ready = await session.connect()
        except ProtocolError as exc:
            explicit = self.session_id or self.resume_token
            if exc.code not in STALE_CODES or explicit or not (session.session_id or session.resume_token):
                raise
            print(f"saved session no longer valid ({exc.code}); starting a new one", file=self.err)
            self.state.forget(self.server)
            session.session_id = session.resume_token = None
            ready = await session.connect()
        self.remember(session)
        return ready

    def remember(self, session: AsyncSession) -> None:
        self.state.save(self.server, session_id=session.session_id, resume_token=session.resume_token)

    def api(self) -> API:
        return API(self.server, self.api_key)
