"""Lab helpers for tests, examples and benchmarks: run real daemons as processes, build
network namespaces. Not part of the installed product."""
