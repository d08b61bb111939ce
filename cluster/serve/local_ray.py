"""`moe-cluster serve`: start (or join) Ray on this machine and run the Serve app until interrupted."""

from __future__ import annotations

import os
import sys
import time

from cluster.serve.args import ServeArgs

APP_NAME = "moe-cluster"


def run_on_ray(args: ServeArgs, host: str, port: int) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster needs no token file
    import ray
    from ray import serve

    from cluster.serve.app import resolve_on_cluster, serve_app

    ray.init(log_to_driver=True)  # joins RAY_ADDRESS when set, else starts a local cluster
    try:
        serve.start(http_options={"host": host, "port": port})
        resolved = resolve_on_cluster(args)
        serve.run(serve_app(resolved), name=APP_NAME, route_prefix="/")
        print(f"serving {resolved.model_name} on http://{host}:{port}/v1 ({resolved.num_shards} expert shards on Ray); "
              f"Ctrl-C stops", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
