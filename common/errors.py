"""Errors meant for users: one line that says what is wrong and how to fix it."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")


class UserError(Exception):
    """A mistake in the user's input (config, arguments, data); printed as one line, no traceback."""


class ConfigError(UserError):
    """A configuration key or value that cannot be accepted."""


def out_of_space(exc: BaseException) -> bool:
    """Whether ``exc``, or anything it wraps (causes, contexts, torch DCP's per-rank ``failures``),
    is a full disk or an exhausted quota. Libraries that write for us (DCP, safetensors) wrap the
    OSError or keep only its text, so both the errno and the message count."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(e) for text in DISK_FULL_TEXT):
            return True
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return False


def exit_status(name: str, run: Callable[[], int | None]) -> int:
    """``run()``'s status for a command line: a user error or a full disk is one line on stderr and
    status 2, Ctrl-C is 130; anything else is a bug and keeps its traceback."""
    try:
        return int(run() or 0)
    except UserError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk anywhere else than a checkpoint save (which says more)
        if not out_of_space(exc):
            raise
        print(f"{name}: error: no space left on device writing {exc.filename or 'a file'}: free space and rerun",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
