"""The admin HTTP server (health, readiness, metrics, debug views), on the server's loop."""

from controlplane.admin.http import AdminState, Readiness, create_admin_app, start_admin

__all__ = ["AdminState", "Readiness", "create_admin_app", "start_admin"]
