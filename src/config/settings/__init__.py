from src.config.settings.base import Environment, Settings, SettingsError, load_settings

__all__ = ["Environment", "Settings", "SettingsError", "load_settings"]
