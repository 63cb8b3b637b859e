"""Notifications about backups (email, Slack-compatible webhook). Filled in by the notifications work."""


def backup_finished(backup_id: int) -> None:
    """Called after every backup ends (succeeded or failed); sends what the policy asks for."""
