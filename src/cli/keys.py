"""Placeholder until the signing-key commands land (``src.cli`` imports this module)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pass
