"""Data parallelism: the communicator (the only mpi4py user), launcher and thread set-up, and
model replicas that run a rank's share of a batch in threads."""
