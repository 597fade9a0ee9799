"""The chaos suite: the failures of issue 8 as tests against the real server and Envoy."""
