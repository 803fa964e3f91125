"""One module per model family: its `FAMILY` record (models/family.py) and the recipe of its tiny model."""
