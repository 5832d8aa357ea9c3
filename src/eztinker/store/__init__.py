"""Durable state: runs, jobs, checkpoints and per-step metrics, in SQLite (default) or PostgreSQL.

```python
store = Store(sqlite_url(data_dir))          # or Store("postgresql://user:pw@host/db")
lost = store.mark_active_runs_lost()         # at startup: adapters died with the old process
store.fail_inflight_jobs("the server restarted before the job finished")
store.add_job(JobRecord(job_id=..., op="forward_backward", run_id=..., owner=...))   # at submit
store.finish_job(job_id, status="completed", result={...}, started_at=..., finished_at=...)
```

`records.py` holds the values (frozen dataclasses) and errors, `models.py` the tables, `db.py` the `Store`.
"""

from eztinker.store import records
from eztinker.store.db import Store, sqlite_url
from eztinker.store.records import *  # noqa: F403 (the records and errors: `records.__all__`)

__all__ = ["Store", "sqlite_url"]
__all__ += records.__all__
