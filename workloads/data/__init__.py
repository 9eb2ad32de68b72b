"""Training data: the `data` block (`recipe`), formats, chat rendering, tokenizing and packing (`formats`), where rows
come from (`sources`) and the checks run before training (`check`)."""
