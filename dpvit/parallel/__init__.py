"""Data parallelism: the communicator (`mpi_comm.py` is the only mpi4py user), the collective
deadline, gradient synchronisation, launcher and thread set-up, and model replicas that run a
rank's share of a batch in threads."""
