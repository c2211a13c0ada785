"""Typed errors. Every message says what is wrong and what to do about it."""


class OmniExportError(Exception):
    """Base of every error the library raises on purpose."""


class ConfigError(OmniExportError):
    """A configuration (dataclass, TOML, config.json) is malformed."""


class UnknownNameError(ConfigError):
    """A name looked up in a registry does not exist."""


class CheckpointError(OmniExportError):
    """A checkpoint directory is missing files, has corrupt files, or its tensors do not match."""


class UnknownModelTypeError(CheckpointError):
    """config.json names a model_type no family handles."""


class InputError(OmniExportError):
    """A user-supplied input (audio, image, text) cannot be used."""


class AudioInputError(InputError):
    pass


class ImageInputError(InputError):
    pass


class VideoInputError(InputError):
    pass


class ContextOverflowError(OmniExportError):
    """A prompt or conversation does not fit in the KV cache."""


class ProfileError(ConfigError):
    """A device profile is malformed or unknown."""


class OutputError(OmniExportError):
    """Where a result would be written cannot take it (a file, someone else's folder, no write access)."""
