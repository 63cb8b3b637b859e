"""Base class for Kasa's management commands: the CLI contract.

Every command takes --json and then prints exactly one JSON object or array on
stdout. Exit codes: 0 = done, 1 = the operation failed, 2 = bad input.
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

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

    def execute(self, *args, **options):
        self.json_output = options.get("json", False)
        if self.json_output:
            StdoutHandler.json_command_running = True  # stdout carries only the JSON document
        try:
            return super().execute(*args, **options)
        except CommandError as exc:
            if self.json_output and not getattr(exc, "_kasa_printed", False):
                self.emit({"error": str(exc), "exit_code": exc.returncode})
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
            self.emit(document)
            exc._kasa_printed = True
        raise exc
