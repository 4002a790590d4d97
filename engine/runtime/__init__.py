"""Running tasks: the worker and its parts (ownership, owned, deciding, executor, fence, slots), the attempt runner, isolation (parent, child, wire), admission, dispatch, timers, snapshots."""
