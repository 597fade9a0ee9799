"""An ingress gateway's resources: listeners per Gateway listener port (HTTP; HTTPS
terminated with per-stream SDS certificates; TLS passed through by SNI), route tables
from the HTTPRoutes and GRPCRoutes attached to the Gateway, and the clusters it
reaches. Pure."""
