"""``controlplane status``: every connected proxy and whether it has its config, read
through CSDS from one or more replicas (like ``istioctl proxy-status``)."""
