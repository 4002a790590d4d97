"""What a task body uses: `@task`, `@step`, the run context, waits, retry policies, schedules, emit, logs."""
