"""
The benchmark harness behind benchmarks/run.py, one module per responsibility:
processes, resources, data set, servers, clients, workloads and report.
"""
