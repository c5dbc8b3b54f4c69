"""The one exception type for mistakes in what a user handed us (files, checkpoints, options).

The command line prints it as a single line and exits with status 2, without a traceback; library
callers can catch it as a ValueError."""


class UserInputError(ValueError):
    """A bad input file, checkpoint or option; the message names it and says what was expected."""
