"""Every route of API version 1, in one list."""

from fastapi import APIRouter

from src.api.routes import auth, clients, consents, health, mfa, users

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(auth.router)
api_router.include_router(users.router)
api_router.include_router(mfa.router)
api_router.include_router(mfa.admin_router)
api_router.include_router(consents.router)
api_router.include_router(clients.router)
