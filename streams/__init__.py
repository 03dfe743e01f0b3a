"""Streams: topic names and message contracts, validation and the dead-letter
path, the pure processors (scorer, learner), and their Kafka hosts."""
