"""Continuous learning: the model registry, labelling captured inputs, retraining from the champion, and the
champion/challenger gate (capture itself lives in deploy/, where the server is)."""
