"""Command lines: ``finetune``, ``evaluate``, ``visualize``; export and timing helpers."""
