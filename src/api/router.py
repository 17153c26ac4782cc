"""Every route of API version 1, in one list."""

from fastapi import APIRouter

from src.api.routes import auth, clients, consents, events, health, keys, mfa, users

api_router = APIRouter()
# In order of traffic: FastAPI tries routes one by one, and every route tried before the right
# one costs the request (measured with ``make bench``: BENCHMARKS.md).
api_router.include_router(users.router)
api_router.include_router(auth.router)
api_router.include_router(health.router)
api_router.include_router(mfa.router)
api_router.include_router(mfa.admin_router)
api_router.include_router(consents.router)
api_router.include_router(clients.router)
api_router.include_router(keys.router)
api_router.include_router(events.router)

api_routers = [
    users.router,
    auth.router,
    health.router,
    mfa.router,
    mfa.admin_router,
    consents.router,
    clients.router,
    keys.router,
    events.router,
]
