"""The mini world's three tasks: mini_code, mini_sql, mini_shell (see :mod:`cycleqd.mini`)."""
from cycleqd.tasks.mini.code import MiniCode
from cycleqd.tasks.mini.shell import MiniShell
from cycleqd.tasks.mini.sql import MiniSQL

__all__ = ["MiniCode", "MiniSQL", "MiniShell"]
