"""The stages: scorer, learner and monitor, one module each.

Each is a pure processor (a batch of messages in, the messages to write out) over
the state it is given; the runtimes host them.
"""
