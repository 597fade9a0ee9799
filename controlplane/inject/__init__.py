"""Getting sidecars into pods: capture rules (iptables), pod patching, the webhook.

Beside the pipeline, not in it: it uses the bootstrap and the mesh model, never the
server, cache or translator. Pure planning in the middle (rules, patches), side effects at
the edges (``iptables.py`` runs iptables, ``webhook.py`` serves HTTPS).
"""
