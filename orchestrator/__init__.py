"""seedsift orchestrator: job configuration, corpus reading, planning, storage and the Ray Data wiring."""
