"""The hotline: tickets from alarms and calls, dispatch, escalation, console (issue 5)."""
