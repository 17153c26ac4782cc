"""Every table of the service, imported by Alembic so autogenerate sees them all."""

from src.db.base import Base

__all__ = ["Base"]
