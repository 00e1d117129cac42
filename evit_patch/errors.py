"""Errors evit_patch raises for a model or a file it cannot use; each message names the fix."""


class UnsupportedModelError(TypeError):
    """The model is not a Vision Transformer this patch can reorganize.

    A subclass of ``TypeError`` because, like any wrong-type argument, the fix is to
    pass a different model; the message names the model and the reason.
    """

    def __init__(self, model_name: str, reason: str) -> None:
        super().__init__(f"evit_patch cannot patch {model_name}: {reason}")
        self.model_name = model_name
        self.reason = reason


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be read or does not fit; the message names the file and why."""
