"""The long-running daemon: webhook intake, event bus, work queue, schedules."""
