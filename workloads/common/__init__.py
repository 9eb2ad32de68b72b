"""What every capability shares: recipe reading and errors (`recipe`), paths, the run and tracking blocks, run
outputs and reporting, the entry-point helpers, submission to a cluster, multi-node storage checks, collectives."""
