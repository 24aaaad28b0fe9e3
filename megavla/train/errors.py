"""Training failures a user can act on. Each message says what failed, where, and the fix; the
entry points print it as one line (no traceback per rank) and exit with EXIT_TRAINING_ERROR."""
from __future__ import annotations

EXIT_TRAINING_ERROR = 1


class TrainingError(RuntimeError):
    """Raised identically on every rank (ranks agree before raising), so rank 0 alone reports it."""


class ResumeError(TrainingError):
    """The run dir cannot be resumed (or started) as asked."""


class RunDirBusy(TrainingError):
    """Another live run holds the run dir's lock."""


class CheckpointError(TrainingError):
    """A checkpoint could not be written; earlier checkpoints are untouched."""


class NonFiniteError(TrainingError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""
