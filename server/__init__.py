"""The dynarank server: HTTP/websocket app, generation engines, sessions and background adaptation."""
