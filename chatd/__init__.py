"""chatd: a chat backend (REST + Socket.IO) on Tornado, python-socketio, PostgreSQL and Redis."""

__version__ = "0.1.0"
