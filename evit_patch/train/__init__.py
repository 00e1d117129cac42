"""Fine-tuning from YAML recipes: the recipe schema, the one method registry, model
assembly, data, losses, optimizer and schedules, the loop, checkpoints and distributed runs."""
