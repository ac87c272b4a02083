"""Errors the runner raises for bad input, so callers (CLI, API) can report them without a torch traceback."""


class ModelLoadError(ValueError):
    """The model source cannot be used: unknown name, missing files, corrupt or unsupported checkpoint."""


class InvalidRequestError(ValueError):
    """A request the runner cannot serve: empty prompt, prompt longer than the context window, bad parameters."""


class InvalidSamplingParams(InvalidRequestError):
    """A sampling parameter out of its range (SamplingParams.validate): the API answers it 422, like its own
    field checks, where other invalid requests (the prompt) are 400."""


class ContextLengthExceeded(InvalidRequestError):
    """prompt + max_tokens exceed the context window (model_runner/context_window.py): the API answers it 400
    context_length_exceeded."""
