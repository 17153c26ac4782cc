"""Every router of the console, in the order they are installed (src/web/install.py)."""

from fastapi import APIRouter

from src.web.admin import clients, events, health, keys, signin, users

admin_routers: list[APIRouter] = [
    signin.router,
    users.new_router,
    users.router,
    clients.router,
    keys.router,
    health.router,
    events.router,
]
