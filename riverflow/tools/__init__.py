"""Tools around the runtime: the demo, the local stack, the event generator, the
benchmarks and the evaluations. Nothing here runs in a production stage."""
