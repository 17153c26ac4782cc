"""The running service: what it is made of (``container``), how the parts are put together at
start-up and taken apart at shut-down (``wiring``), and how healthy they are (``health``).

This is the top of the package graph: it may import every other package, and none imports it
back (``src.api`` and the specification's ``src.config.events`` excepted, which sit on top).
"""
