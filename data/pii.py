"""PII redaction, as datatrove's PIIFormatter does it: emails and public IPv4 addresses are replaced
by fixed stand-ins (datatrove's first replacement strings), so the text still reads as text."""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

EMAIL = re.compile(r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                   r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b")
# not inside a longer dotted number (a version such as 1.2.3.4.5); a sentence's full stop may follow
IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?!\.?\d)")
EMAIL_REPLACEMENT = "email@example.com"
IPV4_REPLACEMENT = "22.214.171.124"


def redact(text: str, counts: Counter[str]) -> str:
    """``text`` with emails and public IPv4 addresses replaced; adds what it replaced to ``counts``."""

    def email(match: re.Match[str]) -> str:
        counts["email"] += 1
        return EMAIL_REPLACEMENT

    def ipv4(match: re.Match[str]) -> str:
        if not ipaddress.ip_address(match.group()).is_global:  # 10.0.0.1, 127.0.0.1: not personal
            return match.group()
        counts["ipv4"] += 1
        return IPV4_REPLACEMENT

    return IPV4.sub(ipv4, EMAIL.sub(email, text))
