"""The launcher: the pilot job inside a batch allocation.

Rank 0 (or the only process) holds a session stream to the server, grants credits from the
node manager's free capacity, runs the jobs it is leased and reports their transitions
through an outbox. Pure parts (node discovery, packing, MPI launch argv, the outbox, the job
process spec) are separate modules from the I/O (processes, the stream, MPI messages).
Only modules named `mpi_*` import mpi4py: importing it initialises MPI.
"""
