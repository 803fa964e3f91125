"""What `train` is built from: the model, the memory plan, the loop and its checkpoints, the step plan."""
