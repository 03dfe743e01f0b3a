"""Online features: windowed aggregates per entity, kept in Redis (or in memory).

``definitions`` declares features; ``store`` keeps the time-bucketed tiles they
are computed from and the point-in-time snapshot of what each event was scored
with. Nothing here knows about Kafka or models.
"""
