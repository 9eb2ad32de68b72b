"""`python -m workloads.align RECIPE`: the `llmc align` job (see workloads.align.run)."""

from workloads.align.run import main

raise SystemExit(main())
