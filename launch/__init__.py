"""Entry points and cluster glue: the `tessera` CLI, launchers, SLURM rendering."""
