"""The top of the stack: the ``sslab`` command line over orchestrator/ and pipelines/."""
