"""One router per resource; each route is a thin call into `api.serving`."""
from loraplex.api.routes import adapters, chat, completions, console, files, fine_tuning, health, me, models, tgi

ROUTERS = (health.router, models.router, completions.router, chat.router, tgi.router, adapters.router,
           files.router, fine_tuning.router, me.router)
CONSOLE_ROUTER = console.router  # included when settings.console
