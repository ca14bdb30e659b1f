"""`ddlp studio`: a local web page for "what if...?" editing of a DDLP model's particles.

The server (standard library only) is in `server.py`; the page (plain HTML, JavaScript and CSS,
nothing fetched from the internet) is in `static/`.
"""
from .server import Studio, balls_clips, folder_clips, make_server

__all__ = ["Studio", "balls_clips", "folder_clips", "make_server"]
