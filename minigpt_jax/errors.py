"""The one exception type for mistakes a user can fix.

Launchers turn it into a single `error: ...` line on stderr, so the message
itself must name the problem and the fix.

Owns: `UserError`. Imports nothing of ours.
"""


class UserError(Exception):
  """Bad input (config, file, prompt, checkpoint) with a one-line fix."""
