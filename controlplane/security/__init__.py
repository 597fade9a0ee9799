"""Workload identity and the control plane's trust: the CA, workload certificates, proxy
credentials and the secrets sidecars get over SDS.

Beside the pipeline, like ``inject/``: the server, the app and injection use it; it uses
none of the pipeline's stages. Side effects (files, the Kubernetes API) stay in the modules
that say so in their name (``castore``, ``tokenreview``); the rest is pure.
"""
