"""What each script trains: a :class:`engine.Task` per job (pretraining, classification, segmentation)."""
