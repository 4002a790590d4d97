"""Running tasks: the worker (partition ownership, tail, decisions), the attempt runner, isolation, admission, dispatch, timers, snapshots."""
