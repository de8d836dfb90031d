"""One ``APIRouter`` per resource; ``server.app.main`` includes them in this order."""

from server.app.routers import (
    adapters,
    chat,
    completions,
    dashboard,
    feedback,
    files,
    fine_tuning,
    health,
    models,
    sessions,
)

ROUTERS = [health.router, completions.router, chat.router, models.router, sessions.router, adapters.router,
           feedback.router, files.router, fine_tuning.router, dashboard.router]
