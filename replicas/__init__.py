"""Scale-out: several jitney engines (replicas) behind one HTTP front end, on Ray Serve.

  deployment.py     JitneyReplica: one Engine in a Ray Serve deployment (streams outputs, reports its load)
  policy.py         the routing decision itself, plain Python: prefix | p2c | round-robin
  router.py         JitneyRouter: Ray Serve's RequestRouter, feeding policy.py what the replicas report
  remote_engine.py  RemoteEngine: the EngineClient api/ is built over, over a Ray Serve handle
  metrics.py        /metrics across replicas: merged, per replica, and the routing counters
  launch.py         `jitney serve --replicas N`: start or join Ray, deploy, serve the same Starlette app

Ray is an optional extra (pip install -e .[scale]); nothing outside this package imports it.
"""
