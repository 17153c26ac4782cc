"""Any other address under /admin: the console's readable error page, never the API's
problem+json. 405 (with ``Allow``) when the address is a console page that takes another method
(a link or an image pointing at a form's action), 404 otherwise. Installed after every other
console router: it only answers what none of them does."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from src.web.admin.pages import AdminRoute, error_page

_ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def allowed_methods(routers: list[APIRouter], path: str) -> set[str]:
    """The methods the console's own routes accept at ``path`` (none: no such page)."""
    methods: set[str] = set()
    for console_router in routers:
        for route in console_router.routes:
            if isinstance(route, APIRoute) and route.path_regex.fullmatch(path):
                methods |= route.methods or set()
    return methods


def fallback_router(page_routers: list[APIRouter]) -> APIRouter:
    """The catch-all for /admin, answering for the console pages of ``page_routers``."""
    router = APIRouter(route_class=AdminRoute, include_in_schema=False)

    @router.api_route("/admin/{rest:path}", methods=_ANY_METHOD)
    async def no_such_page(request: Request, rest: str) -> Response:
        allowed = allowed_methods(page_routers, request.url.path)
        if not allowed:
            return error_page(request, 404, "Not Found", "There is no such page.")
        response = error_page(
            request,
            405,
            "Method Not Allowed",
            "This page cannot be opened that way: use the console's links and buttons.",
        )
        response.headers["Allow"] = ", ".join(sorted(allowed))
        return response

    return router
