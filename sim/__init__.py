"""jitney's own scheduler on a simulated device: a virtual-time event loop (loop.py), step-cost models
(cost.py, hardware.py, calibrate.py with insitu.py), a runner that computes nothing (runner.py) and `jitney simulate`
(simulate.py). docs/simulation.md says what is modelled and what is not yet validated."""
