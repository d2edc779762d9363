"""Self-supervised methods: each module owns its heads, EMA teacher, queue and schedules."""
