"""Search with Ray Tune (`llmc search`): over prompt variants (`prompts`, kind prompt_search, its recipe in
workloads.prompting.recipe) and over fine-tuning hyperparameters (`hparams`, kind hparam_search, `recipe`)."""
