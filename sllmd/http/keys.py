"""Typed application state keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from sllmd.node import Node

NODE: web.AppKey[Node] = web.AppKey("node")
