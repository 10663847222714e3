"""The throw-away MariaDB server of the task tests, for the hostile-SQL suite too."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_task_fixtures", Path(__file__).parents[1] / "tasks" / "conftest.py")
_tasks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tasks)

mariadb_url = _tasks.mariadb_url
