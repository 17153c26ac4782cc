"""Every router of the console, in the order they are installed (src/web/install.py)."""

from fastapi import APIRouter

from src.web.admin import clients, events, health, keys, signin, users
from src.web.admin.fallback import fallback_router

page_routers: list[APIRouter] = [
    signin.router,
    users.new_router,
    users.router,
    clients.router,
    keys.router,
    health.router,
    events.router,
]
# Any other /admin address gets the console's error page: last, so it answers only the rest.
admin_routers: list[APIRouter] = [*page_routers, fallback_router(page_routers)]
