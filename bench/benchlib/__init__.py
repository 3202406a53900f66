"""The bench harness behind bench/run, one module per concern: config (jobs,
rows, the run's Config), processes (children, mounts, loop devices), fio,
rows (the main table's measurements), extras (nbdcopy, migration), report
(tables and JSON). Imports go one way, in that order. certs (openssl
certificates for the TLS servers) imports nothing of the bench: the tests use it
too."""
