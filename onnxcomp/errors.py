"""The one exception type that reaches users as a one-line message."""


class OnnxcompError(Exception):
    """A problem with the user's input (model, data, options), told in one line.

    The CLI prints ``onnxcomp: error: <message>`` and exits non-zero; anything
    else that escapes is a bug in onnxcomp.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
