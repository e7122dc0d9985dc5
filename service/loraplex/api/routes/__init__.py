"""One router per resource; each route is a thin call into `api.serving`."""
from loraplex.api.routes import adapters, chat, completions, files, fine_tuning, health, models, tgi

ROUTERS = (health.router, models.router, completions.router, chat.router, tgi.router, adapters.router,
           files.router, fine_tuning.router)
