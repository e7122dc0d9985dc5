"""One router per resource; each route is a thin call into `api.serving`."""
from loraplex.api.routes import adapters, chat, completions, health, models, tgi

ROUTERS = (health.router, models.router, completions.router, chat.router, tgi.router, adapters.router)
