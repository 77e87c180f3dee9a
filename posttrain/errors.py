"""Errors a user can cause. The CLI prints these as one clear message, never a traceback."""


class PosttrainError(Exception):
    """A problem with the user's input or environment (recipe, data, paths, resources).

    The message names what is wrong and where, and says what to do.
    """
