"""Ray Serve deployments: Ingress, PrefillServer, DecodeServer, EngineServer, and `build_app`. The only package
that imports ray.serve."""
