"""The one error type users see: a clear, one-line message that names the problem and the fix."""


class KolorsError(ValueError):
    """Bad input, a bad model folder or a bad weight file. The CLI prints it in one line and exits 2."""
