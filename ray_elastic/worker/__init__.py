"""Worker side: the actor that runs train_fn in rounds, and its process-group handling."""
