"""The composition root: the `jitney` command (jitney/cli.py) wires api, batcher, replicas, benchmarks and sim."""
