"""User-facing error types.

Each class is one kind of user mistake. Messages are a single line that names
the file or key at fault and says how to fix it; command-line entry points
print them without a traceback (see ``caiman_asr_train.utils.cli``).
Standard library only, so ``core`` stays importable without the training stack.
"""


class UserError(Exception):
    """An expected mistake in user input: printed as one line, exit status 2."""


class ConfigError(UserError):
    """A YAML config is missing, malformed, or has a wrong or unknown key."""


class DataError(UserError):
    """A manifest, audio file, statistics file or dataset is missing or corrupt."""


class TokenizerError(UserError):
    """A SentencePiece model is missing or a transcript cannot be tokenized."""


class CheckpointError(UserError):
    """A training or hardware checkpoint is missing, corrupt or incompatible."""


class HardwareCheckpointError(CheckpointError):
    """A hardware checkpoint cannot be created from the given inputs."""


class ExportError(UserError):
    """An inference export cannot be written: output in the way, bad options, or a failed WER gate."""


class OutputError(UserError):
    """An output file cannot be written: read-only location, a directory in the way, or no space left."""
