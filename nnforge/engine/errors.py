"""Training outcomes the command line turns into exit codes; kept free of torch so the CLI starts fast."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: a checkpoint was saved at a step boundary."""
