"""The project's user-facing error base (docs/design.md §10).

Every error a user can fix — bad config, missing or foreign data, a run dir that holds another run, a broken
checkpoint — derives from UserError and carries ONE actionable line (what is wrong, what to do). The CLI layer
(hydra_cli.run, the sweep, two_stage.py) prints `error: <line>` and exits with `exit_code`; `CAD_DEBUG=1`
shows the traceback. Anything else is a bug or a library failure and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A user-facing error: its message is one actionable line."""

    exit_code = 2


class EvalError(UserError, ValueError):
    """Bad evaluation input (config, checkpoint contents, rollout or metric arguments); the message says what is
    wrong and the fix. Raised by rollout.py, metrics.py and evaluate.py."""
