"""Base class for Kasa's management commands: the CLI contract.

Every command takes --json and then prints exactly one JSON object or array on
stdout. Exit codes: 0 = done, 1 = the operation failed, 2 = bad input.

An error is a sentence on stderr ("No customer with domain 'x'."), never
Django's "BadInput: ..." class-name prefix; in JSON mode the document keeps the
class name in `type` ({"error": ..., "type": "BadInput", "exit_code": 2}).
"""

from __future__ import annotations

import json
import sys

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, SystemCheckError, handle_default_options
from django.db import connections

from core.logging import StdoutHandler

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class BadInput(CommandError):
    def __init__(self, message: str):
        super().__init__(message, returncode=EXIT_BAD_INPUT)


class OperationFailed(CommandError):
    def __init__(self, message: str):
        super().__init__(message, returncode=EXIT_FAILED)


class KasaCommand(BaseCommand):
    json_output = False
    # Django's system checks import every admin and URL module before each command (~0.1 s); they run
    # in `manage.py check`, `migrate` and the test suite, not before every backup.
    requires_system_checks = []

    def create_parser(self, prog_name, subcommand, **kwargs):
        # "resolve": a command may redefine Django's own --version (customer_add
        # uses --version COMPONENT=VERSION, as the CLI contract says).
        kwargs.setdefault("conflict_handler", "resolve")
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        # argparse errors are bad input: exit 2 (argparse's own code), as the contract says.
        return parser

    def run_from_argv(self, argv):
        """Django's run_from_argv, with an error printed as a sentence instead of "ClassName: message"."""
        self._called_from_command_line = True
        parser = self.create_parser(argv[0], argv[1])
        options = parser.parse_args(argv[2:])
        cmd_options = vars(options)
        args = cmd_options.pop("args", ())
        handle_default_options(options)
        try:
            self.execute(*args, **cmd_options)
        except CommandError as exc:
            if options.traceback:
                raise
            if isinstance(exc, SystemCheckError):
                self.stderr.write(str(exc), lambda x: x)
            else:
                self.stderr.write(sentence(str(exc)))
            sys.exit(exc.returncode)
        finally:
            try:
                connections.close_all()
            except ImproperlyConfigured:
                pass

    def execute(self, *args, **options):
        self.json_output = options.get("json", False)
        if self.json_output:
            StdoutHandler.json_command_running = True  # stdout carries only the JSON document
        try:
            return super().execute(*args, **options)
        except CommandError as exc:
            if self.json_output and not getattr(exc, "_kasa_printed", False):
                self.emit({"error": str(exc), "type": type(exc).__name__, "exit_code": exc.returncode})
            raise

    def emit(self, document) -> None:
        """Write the one JSON document (json mode) on stdout."""
        # Through self.stdout (sys.stdout unless call_command redirected it).
        self.stdout.write(json.dumps(document, indent=2, default=str, sort_keys=False))
        self.stdout.flush()

    def fail(self, message: str, document=None):
        """End with exit 1, printing `document` first in JSON mode."""
        exc = OperationFailed(message)
        if self.json_output and document is not None:
            if isinstance(document, dict):
                document = {**document, "type": document.get("type") or type(exc).__name__}
            self.emit(document)
            exc._kasa_printed = True
        raise exc


def sentence(message: str) -> str:
    """A message as a sentence: its first letter capitalised, a full stop unless it ends with one of its own."""
    text = message.strip() or "The command failed."
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."
