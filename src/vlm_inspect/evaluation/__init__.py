"""The evaluation behind `evaluate`: metrics with intervals, what each model sees, and the report."""
