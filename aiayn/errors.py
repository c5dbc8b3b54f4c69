"""The one exception type for mistakes in what a user handed us (files, checkpoints, options).

The command line prints it as a single line and exits with status 2, without a traceback; library
callers can catch it as a ValueError. Usage errors (argparse's) get one line too:
:class:`ArgumentParser`."""

import argparse


class UserInputError(ValueError):
    """A bad input file, checkpoint or option; the message names it and says what was expected."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line (argparse prints the whole usage first) with
    a pointer to --help; exit status 2 as before. Subcommand parsers inherit the class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
