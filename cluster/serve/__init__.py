"""Serving on Ray Serve: Ingress -> AttentionRouter (engine) -> ExpertShard actors; or all in one process."""
