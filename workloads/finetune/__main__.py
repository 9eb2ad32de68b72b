"""`python -m workloads.finetune RECIPE`: the `llmc finetune` job (see workloads.finetune.driver)."""

from workloads.finetune.driver import main

raise SystemExit(main())
