"""Keys never reach logs or spans: query parameters that may carry one are redacted wherever a URL is written.

HTTP refuses keys in URLs (app/admission.py); /ws accepts `?api_key=` because browsers cannot set
its headers, and uvicorn logs a WebSocket's path with its query string, so both places redact.
"""

from __future__ import annotations

import logging
import re

# Query parameters that carry a key in a URL.
URL_KEY_PARAMETERS = ("api_key", "api-key", "apikey", "key", "access_token", "token")
REDACTED = "REDACTED"
_KEY_IN_QUERY = re.compile(
    r"([?&](?:" + "|".join(re.escape(name) for name in URL_KEY_PARAMETERS) + r")=)[^&\s\"'#]*", re.IGNORECASE
)


def redact_url_keys(text: str) -> str:
    if "=" not in text:
        return text
    return _KEY_IN_QUERY.sub(r"\g<1>" + REDACTED, text)


class RedactKeysFilter(logging.Filter):
    """Rewrites a record's message and string arguments (uvicorn logs `"WebSocket /ws?api_key=..."`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_url_keys(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_url_keys(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True
