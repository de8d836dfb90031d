"""The IDE websocket ``/v1/ws``: message schema (``protocol``) and per-socket handling (``connection``)."""
