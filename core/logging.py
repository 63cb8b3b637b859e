"""JSON-lines log formatter for staging and production (one object per line)."""

import json
import logging
import sys
from datetime import UTC, datetime

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class StdoutHandler(logging.StreamHandler):
    """Logs on stdout, except while a `--json` command owns stdout for its one document."""

    json_command_running = False

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr if StdoutHandler.json_command_running else sys.stdout

    @stream.setter
    def stream(self, value):
        pass
