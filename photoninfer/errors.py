"""Typed errors. The server maps them to OpenAI-style 4xx responses; none of them is the engine's fault."""


class PhotonInferError(Exception):
    """Base class for every error PhotonInfer raises on purpose."""


class ConfigError(PhotonInferError, ValueError):
    """An engine or model configuration value is invalid or unsupported."""


class ModelLoadError(PhotonInferError):
    """A model file or tensor is missing, malformed or of an unsupported kind. The message names the file/key."""


class InvalidRequestError(PhotonInferError, ValueError):
    """A request (prompt or sampling parameter) is invalid. `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
