"""The site daemon's side of balsam-grpc: what runs on an HPC login node.

Subpackages: `schedulers` (batch-scheduler adapters: local, slurm, pbs, cobalt, lsf) and
`platforms` (platform presets as data files). This module imports nothing so that importing
one part of the site does not pull in the others.
"""
